"""Evaluation sets for `lmforge bench curate`, built from ../shared/data (see its MANIFEST.md).

- dedup: WikiText-2 paragraphs (valid + test) and Chinese text (lingua's zh sentences in groups of
  three, chinese-poetry paragraphs), with planted near duplicates (a random 5-15% of the words, or
  characters for Chinese, replaced by others from the corpus) and exact duplicates (case and
  punctuation changed), appended after the originals.
- PII: presidio-research's synthetic sentences (their spans are the truth) and a Chinese set built
  here from templates with valid IDs (checksum), Luhn-valid cards, mainland phones, emails and IPs.
- langid: lingua's test sentences for en, zh, de, fr, es, ja, ru of at least 50 characters.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

DEDUP_ZH_GROUP = 3
LANGID_LANGUAGES = ("en", "zh", "de", "fr", "es", "ja", "ru")
# presidio entity type -> our PII type
PRESIDIO_TYPES = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "IP_ADDRESS": "ip", "CREDIT_CARD": "bank_card"}


def wikitext_paragraphs(root: Path, min_chars: int = 200) -> list[str]:
    out = []
    for name in ("valid.txt", "test.txt"):
        text = (root / "pretrain/wikitext-2" / name).read_text(encoding="utf-8")
        out += [p.strip() for p in text.split("\n") if len(p.strip()) >= min_chars and not p.strip().startswith("=")]
    return out


def chinese_texts(root: Path, min_chars: int = 60) -> list[str]:
    lines = [ln.strip() for ln in (root / "misc/langid/lingua-sentences/zh.txt").read_text(encoding="utf-8").splitlines()
             if ln.strip()]
    out = ["".join(lines[i:i + DEDUP_ZH_GROUP]) for i in range(0, len(lines) - DEDUP_ZH_GROUP + 1, DEDUP_ZH_GROUP)]
    for path in sorted((root / "pretrain/chinese-poetry").rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data if isinstance(data, list) else [data]
        for record in records:
            if isinstance(record, dict):
                paragraphs = record.get("paragraphs") or record.get("content") or []
                text = "".join(p for p in paragraphs if isinstance(p, str))
                if len(text) >= min_chars and "□" not in text:
                    out.append(text)
    return out


def _edit(text: str, rng: random.Random, fraction: float, pool: list[str], by_chars: bool) -> str:
    units = list(text) if by_chars else text.split(" ")
    for i in rng.sample(range(len(units)), max(1, round(len(units) * fraction))):
        units[i] = rng.choice(pool)
    return ("" if by_chars else " ").join(units)


def drop_near_duplicates(docs: list[str], threshold: float, n: int = 2) -> tuple[list[str], int]:
    """The documents without the sources' own near duplicates (exact Jaccard of bigram shingles >= threshold,
    first one kept), and how many were dropped. An exact set-similarity join with the prefix filter (Chaudhuri
    et al. 2006): with shingles ordered rarest first, two sets with Jaccard >= t share one of the first
    |A| - ceil(t |A|) + 1 shingles of A, so only pairs sharing a prefix shingle are compared."""
    import math

    from lifecycle.data.curate.dedup import jaccard, shingles

    sets = [set(shingles(d, n, n)) for d in docs]
    freq = Counter(g for s in sets for g in s)
    index: dict[str, list[int]] = {}
    kept: list[int] = []
    for i, s in enumerate(sets):
        ordered = sorted(s, key=lambda g: (freq[g], g))
        prefix = ordered[: len(ordered) - math.ceil(threshold * len(ordered)) + 1]
        candidates = {j for g in prefix for j in index.get(g, ())}
        if any(jaccard(s, sets[j]) >= threshold for j in candidates):
            continue
        kept.append(i)
        for g in prefix:
            index.setdefault(g, []).append(i)
    return [docs[i] for i in kept], len(docs) - len(kept)


def dedup_corpus(root: Path, out_dir: Path, *, seed: int = 0, near_fraction: float = 0.1,
                 exact_fraction: float = 0.05, max_docs_per_language: int | None = None,
                 natural_threshold: float = 0.3) -> dict:
    """Writes en.jsonl and zh.jsonl; returns the planted duplicates as {"near": [...], "exact": [...]} of
    (file, line) ids as the pipeline names documents, and the number of originals."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = {"near": [], "exact": [], "num_originals": 0, "edit_fractions": [], "natural_near_duplicates_dropped": 0}
    for lang, docs in (("en", wikitext_paragraphs(root)), ("zh", chinese_texts(root))):
        docs = list(dict.fromkeys(docs))  # the sources' own exact repeats are not planted ones
        if max_docs_per_language:
            docs = docs[:max_docs_per_language]
        # ... nor are their near repeats (the same ci in two collections, variant characters 後/后): left in,
        # they would count as false positives of a deduplicator that is right to remove them
        docs, dropped = drop_near_duplicates(docs, natural_threshold)
        truth["natural_near_duplicates_dropped"] += dropped
        by_chars = lang == "zh"
        # sorted: a set's order changes with PYTHONHASHSEED, and the planted edits must not
        pool = sorted({c for d in docs[:500] for c in d if "\u4e00" <= c <= "\u9fff"}) if by_chars else \
            sorted({w for d in docs[:500] for w in d.split() if w.isalpha()})
        path = out_dir / f"{lang}.jsonl"
        rows = list(docs)
        planted = []
        for i in rng.sample(range(len(docs)), int(len(docs) * near_fraction)):
            fraction = rng.uniform(0.05, 0.15)
            truth["edit_fractions"].append(fraction)
            rows.append(_edit(docs[i], rng, fraction, pool, by_chars))
            planted.append(("near", len(rows)))
        for i in rng.sample(range(len(docs)), int(len(docs) * exact_fraction)):
            rows.append(re.sub(r"[.,，。]", "!", docs[i].upper()))
            planted.append(("exact", len(rows)))
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows), encoding="utf-8")
        for kind, line in planted:
            truth[kind].append(f"{path}:{line}")
        truth["num_originals"] += len(docs)
    return truth


def presidio_records(root: Path) -> list[dict]:
    return json.loads((root / "misc/pii/presidio-research/synth_dataset_v2.json").read_text(encoding="utf-8"))


def _cn_id(rng: random.Random) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    body = (f"{rng.choice(['110105', '310115', '440305', '510104', '330106'])}{rng.randint(1950, 2005)}"
            f"{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}")
    return body + "10X98765432"[sum(int(d) * w for d, w in zip(body, weights)) % 11]


def _luhn_card(rng: random.Random) -> str:
    body = [int(c) for c in rng.choice(["622202", "621700", "436742", "552600"])] + \
           [rng.randint(0, 9) for _ in range(9)]
    total = 0
    for i, d in enumerate(reversed(body)):
        total += (d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 == 0 else d
    card = "".join(map(str, body + [(10 - total % 10) % 10]))
    return card if rng.random() < 0.5 else " ".join(card[i:i + 4] for i in range(0, 16, 4))


def chinese_pii_set(n: int = 500, seed: int = 0) -> list[tuple[str, list[tuple[str, str]]]]:
    """(sentence, [(type, value)]) built from templates; values valid by construction."""
    rng = random.Random(seed)

    def phone() -> str:
        mobile = f"1{rng.choice('3456789')}{rng.randint(0, 9)}{rng.randint(0, 99999999):08d}"
        return rng.choice([mobile, f"{mobile[:3]}-{mobile[3:7]}-{mobile[7:]}", f"+86 {mobile}",
                           f"0{rng.choice(['10', '21', '755', '571'])}-{rng.randint(10000000, 99999999)}"])

    makers = {"phone": phone, "cn_id": lambda: _cn_id(rng), "bank_card": lambda: _luhn_card(rng),
              "email": lambda: f"{rng.choice(['zhang', 'li.na', 'wang_wei', 'chen88'])}{rng.randint(1, 999)}@"
                               f"{rng.choice(['qq.com', '163.com', 'example.cn', 'sina.com.cn'])}",
              "ip": lambda: ".".join(str(rng.randint(1, 254)) for _ in range(4))}
    templates = {"phone": ["请拨打{}联系客服。", "我的手机号是{}，有事打给我。", "联系电话：{}"],
                 "cn_id": ["身份证号码{}，请核对。", "申请人身份证：{}"],
                 "bank_card": ["请把钱转到银行卡{}上。", "卡号{}，开户行为招商银行。"],
                 "email": ["发邮件到{}就可以。", "邮箱：{}"],
                 "ip": ["服务器地址是{}，端口8080。", "登录IP为{}的机器。"]}
    out = []
    for _ in range(n):
        kinds = rng.sample(list(makers), rng.randint(1, 2))
        values = [(k, makers[k]()) for k in kinds]
        out.append(("".join(rng.choice(templates[k]).format(v) for k, v in values), values))
    return out


def langid_sentences(root: Path, min_chars: int = 50) -> list[tuple[str, str]]:
    out = []
    for lang in LANGID_LANGUAGES:
        path = root / "misc/langid/lingua-sentences" / f"{lang}.txt"
        out += [(lang, ln.strip()) for ln in path.read_text(encoding="utf-8").splitlines() if len(ln.strip()) >= min_chars]
    return out


def sentence_pools(root: Path) -> tuple[list[str], list[str]]:
    """English sentences (WikiText-2 valid + test) and Chinese ones (lingua's zh, chinese-poetry), >= 20 chars."""
    en = [s for p in wikitext_paragraphs(root, min_chars=1) for s in re.split(r"(?<=[.!?]) +", p) if len(s) >= 20]
    zh = [s for p in chinese_texts(root, min_chars=1) for s in re.split(r"(?<=[。！？])", p) if len(s) >= 20 // 3]
    return en, zh


def scale_corpus(root: Path, path: Path, size_mb: float, *, seed: int = 0, zh_share: float = 0.3,
                 near_rate: float = 0.03, exact_rate: float = 0.02, recent: int = 2000) -> dict:
    """Streams a jsonl of about `size_mb` MB (1e6 bytes) for the memory benchmark; returns its counts.

    Each original document is 4-12 sentences drawn at random from the pools (English, or Chinese with
    probability `zh_share`): real text, and with ~10^4 sentences per pool two documents share almost nothing,
    so the corpus does not collapse under dedup however large it is. After an original, with probability
    `near_rate` a near copy (a random 5-15% of words / characters replaced) and with `exact_rate` an exact
    copy (upper case, punctuation changed) of one of the last `recent` originals is written too. Only that
    window is held, so the generator's memory does not grow with size_mb."""
    from collections import deque

    rng = random.Random(seed)
    en, zh = sentence_pools(root)
    en_words = sorted({w for s in en[:5000] for w in s.split() if w.isalpha()})
    zh_chars = sorted({c for s in zh[:5000] for c in s if "\u4e00" <= c <= "\u9fff"})
    window: deque[tuple[str, bool]] = deque(maxlen=recent)
    counts = Counter()
    written, limit = 0, size_mb * 1e6
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        while written < limit:
            is_zh = rng.random() < zh_share
            picked = rng.choices(zh if is_zh else en, k=rng.randint(4, 12))
            rows = [("".join if is_zh else " ".join)(picked)]
            window.append((rows[0], is_zh))
            counts["original_zh" if is_zh else "original_en"] += 1
            if rng.random() < near_rate:
                text, by_chars = rng.choice(window)
                rows.append(_edit(text, rng, rng.uniform(0.05, 0.15), zh_chars if by_chars else en_words, by_chars))
                counts["planted_near"] += 1
            if rng.random() < exact_rate:
                rows.append(re.sub(r"[.,，。]", "!", rng.choice(window)[0].upper()))
                counts["planted_exact"] += 1
            chunk = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows)
            fh.write(chunk)
            written += len(chunk.encode("utf-8"))
    counts["documents"] = sum(v for k, v in counts.items() if k != "documents")
    return dict(counts) | {"bytes": path.stat().st_size, "pool_sentences_en": len(en), "pool_sentences_zh": len(zh)}
