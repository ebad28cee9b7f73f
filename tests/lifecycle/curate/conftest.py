"""Corpora for the curation tests, generated here: varied English and Chinese prose (so the quality rules keep
it), planted exact and near duplicates, PII, and malformed records next to good ones."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

ADJ = "quiet bright narrow ancient busy distant gentle heavy hidden local modern northern patient rapid rural " \
      "silent simple steady tall warm wooden yellow open careful sudden".split()
NOUN = "river bridge village market teacher harbor museum garden engineer farmer library station mountain " \
       "council festival factory orchard journey letter painter lantern meadow sailor window".split()
VERB = "crossed repaired visited described painted measured followed protected opened studied carried " \
       "welcomed mapped reached built watched".split()
ZH_SUBJ = "老师 学生 农民 工程师 医生 作家 画家 船长 村长 记者 厨师 园丁".split()
ZH_VERB = "修好了 参观了 描写了 画下了 测量了 保护了 打开了 研究了 带来了 欢迎了 记录了 建造了".split()
ZH_OBJ = "那座石桥 河边的磨坊 村里的图书馆 山上的寺庙 港口的灯塔 古老的城墙 新建的车站 南边的果园 " \
         "安静的小院 热闹的集市 博物馆的展品 田野里的小路 湖心的亭子 镇上的邮局 东头的铁匠铺 西街的茶馆 " \
         "学校的操场 海边的渔船 北坡的梯田 祖传的木箱 城外的驿站 院中的古井 桥头的石狮 厂里的机器".split()
ZH_TIME = "清晨 傍晚 去年秋天 上个星期 春节前后 第二天 那年夏天 周末".split()


def english_doc(rng: random.Random, num_sentences: int = 8) -> str:
    sentences = []
    for _ in range(num_sentences):
        sentences.append(f"The {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} the {rng.choice(NOUN)} "
                         f"of the {rng.choice(ADJ)} {rng.choice(NOUN)} with a {rng.choice(ADJ)} "
                         f"{rng.choice(NOUN)} {rng.randint(2, 999)} times.")
    return " ".join(sentences)


def chinese_doc(rng: random.Random, num_sentences: int = 4) -> str:
    # phrases drawn without replacement: real prose does not repeat itself, and the CJK rules would say so
    times, subjects = rng.sample(ZH_TIME, num_sentences), rng.sample(ZH_SUBJ, num_sentences)
    verbs, objects = rng.sample(ZH_VERB, 2 * num_sentences), rng.sample(ZH_OBJ, 2 * num_sentences)
    # plus a run of random common characters per sentence (a name, a place): documents built from ~60 phrases
    # would otherwise share most character bigrams and look like near duplicates of each other
    def name() -> str:
        return "".join(chr(rng.randint(0x4E00, 0x7FFF)) for _ in range(6))

    return "".join(f"{times[i]}，{subjects[i]}{name()}{verbs[2 * i]}{objects[2 * i]}，"
                   f"还{verbs[2 * i + 1]}{name()}的{objects[2 * i + 1]}{rng.randint(2, 999)}次。"
                   for i in range(num_sentences))


def edit_words(text: str, rng: random.Random, fraction: float) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
        words[i] = rng.choice(NOUN)
    return " ".join(words)


def edit_chars(text: str, rng: random.Random, fraction: float) -> str:
    chars = list(text)
    for i in rng.sample(range(len(chars)), max(1, int(len(chars) * fraction))):
        chars[i] = rng.choice("山水风云花草树木")
    return "".join(chars)


def jsonl(path: Path, texts, extra_lines: dict[int, bytes] | None = None) -> Path:
    """Write texts as jsonl; `extra_lines` inserts raw (bad) lines before the given record index."""
    extra_lines = extra_lines or {}
    with open(path, "wb") as fh:
        for i, text in enumerate(texts):
            if i in extra_lines:
                fh.write(extra_lines[i] + b"\n")
            fh.write(json.dumps({"text": text}, ensure_ascii=False).encode() + b"\n")
    return path


@pytest.fixture()
def messy_corpus(tmp_path: Path) -> dict:
    """Two sources (en/, zh/) plus bad files; returns what was planted where."""
    rng = random.Random(0)
    en_dir, zh_dir = tmp_path / "in" / "en", tmp_path / "in" / "zh"
    en_dir.mkdir(parents=True)
    zh_dir.mkdir(parents=True)
    en = [english_doc(rng) for _ in range(40)]
    zh = [chinese_doc(rng) for _ in range(40)]
    en[3] = en[3] + " Write to jane.doe@example.org or call +1 415-555-0134."
    zh[5] = zh[5] + "联系电话13812345678，邮箱 li.lei@example.cn。"
    near_en = edit_words(en[10], rng, 0.05)
    near_zh = edit_chars(zh[10], rng, 0.05)
    exact_en = en[11].replace(" ", "  ").replace(".", "!")  # the same after normalization (spaces, punctuation)
    en_texts = en + [near_en, exact_en]
    zh_texts = zh + [near_zh]
    # bad records between good ones: invalid JSON before record 20, a record without "text" before 21,
    # invalid UTF-8 before 22
    jsonl(en_dir / "part1.jsonl", en_texts, {20: b'{"text": "unterminated', 21: b'{"body": "no text field"}',
                                             22: b'{"text": "caf\xe9 latin-1"}'})
    jsonl(zh_dir / "part1.jsonl", zh_texts)
    (en_dir / "empty.jsonl").write_bytes(b"")
    (zh_dir / "junk.txt").write_bytes(bytes(range(256)) * 4)
    return {"inputs": [str(en_dir), str(zh_dir)], "root": tmp_path,
            "near": {f"{en_dir / 'part1.jsonl'}:{40 + 3 + 1}", f"{zh_dir / 'part1.jsonl'}:41"},
            "near_originals": {f"{en_dir / 'part1.jsonl'}:{10 + 1}", f"{zh_dir / 'part1.jsonl'}:11"},
            "exact": {f"{en_dir / 'part1.jsonl'}:{41 + 3 + 1}"},
            # the good records right after each bad line (line numbers count the bad lines too)
            "next_to_bad": {f"{en_dir / 'part1.jsonl'}:{n}" for n in (22, 24, 26)},
            "bad_lines": {f"{en_dir / 'part1.jsonl'}:{n}" for n in (21, 23, 25)}}
