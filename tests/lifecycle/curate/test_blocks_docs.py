"""Blocks that run on datatrove Documents: language id (lingua), English quality (datatrove's filters), the
quality classifier, MinHash shingling/verification. Real libraries, small inputs written here."""

from __future__ import annotations

import json

import numpy as np
from datatrove.data import Document

from lifecycle.data.curate.config import ClassifierConfig, DedupConfig, LangIdConfig, QualityConfig
from lifecycle.data.curate.dedup import CjkMinhashSignature, jaccard, shingles
from lifecycle.data.curate.langid import LanguageId
from lifecycle.data.curate.quality import Quality
from lifecycle.data.curate.step import read_counts, read_samples

EN = ("The committee met on Tuesday to discuss the new budget for the city's public libraries, and after a long "
      "debate the members agreed to extend opening hours on weekends.")
ZH = "委员会星期二开会讨论了城市公共图书馆的新预算，经过长时间的辩论，委员们同意延长周末的开放时间。"
DE = "Der Ausschuss traf sich am Dienstag, um das neue Budget für die öffentlichen Bibliotheken der Stadt zu besprechen."


def run_block(block, texts, tmp_path):
    docs = [Document(text=t, id=str(i), metadata={}) for i, t in enumerate(texts)]
    kept = list(block.run(iter(docs), rank=0, world_size=1))
    return kept, read_counts(tmp_path, block.block), read_samples(tmp_path, block.block)


def test_langid_keeps_configured_languages_and_names_the_rest(tmp_path):
    block = LanguageId(LangIdConfig(), str(tmp_path))
    mixed = ZH + " " + EN + " " + EN  # two scripts; English dominates by characters
    kept, counts, samples = run_block(block, [EN, ZH, DE, "12345 67890 !!!", mixed], tmp_path)
    assert [(d.id, d.metadata["language"]) for d in kept] == [("0", "en"), ("1", "zh"), ("4", "en")]
    assert counts["removed/language_de"] == 1 and counts["removed/no_letters"] == 1
    assert counts["in"] == 5 and counts["out"] == 3 and counts["detected/de"] == 1
    assert {s["reason"] for s in samples} == {"language_de", "no_letters"}


def test_langid_mixed_document_without_a_dominant_language(tmp_path):
    block = LanguageId(LangIdConfig(min_dominant_share=0.9), str(tmp_path))
    kept, counts, _ = run_block(block, [ZH + " " + EN], tmp_path)
    assert kept == [] and counts["removed/mixed_language"] == 1


def test_english_quality_uses_datatrove_filters_with_reasons(tmp_path):
    good = " ".join([EN] * 6)  # long enough for Gopher's 50 words and C4's 5 sentences
    short = "Buy now. Cheap."
    block = Quality(QualityConfig(english=("gopher_quality", "c4")), str(tmp_path))
    zh_long = ZH + "图书馆馆长表示，新的预算还将用于购买儿童读物和更新阅览室的设备，市民对此普遍表示欢迎。"
    docs_text = [good, short, zh_long]
    docs = [Document(text=t, id=str(i), metadata={"language": lang})
            for i, (t, lang) in enumerate(zip(docs_text, ["en", "en", "zh"]))]
    kept = list(block.run(iter(docs)))
    counts = read_counts(tmp_path, "quality")
    assert [d.id for d in kept] == ["0", "2"]
    assert counts["removed/gopher_quality/gopher_short_doc"] == 1
    # repeated Chinese text is caught by the character-level rules, not by word counts
    kept = list(Quality(QualityConfig(), str(tmp_path)).run(iter([Document(text=ZH * 3, id="z", metadata={})])))
    assert kept == [] and read_counts(tmp_path, "quality")["removed/cjk/top_2gram"] + \
        read_counts(tmp_path, "quality")["removed/cjk/dup_5gram"] >= 1


def test_classifier_learns_good_from_bad_and_filters(tmp_path):
    from lifecycle.data.curate.classifier import ClassifierFilter, train_from_files

    good = [f"Paragraph {i}: the river flows past the old mill, where farmers once brought grain to be ground."
            for i in range(40)] + [f"第{i}段：河水流过古老的磨坊，农民们曾经把粮食带到这里磨成面粉。" for i in range(40)]
    bad = [f"CLICK HERE {i} buy cheap pills casino bonus win win win free free" for i in range(40)] + \
          [f"点击这里{i}免费领取优惠券 赌场 奖金 快来 快来 快来" for i in range(40)]
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in good))
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in bad))
    model_path = tmp_path / "q.npz"
    _, metrics = train_from_files([str(tmp_path / "good.jsonl")], [str(tmp_path / "bad.jsonl")], str(model_path))
    assert metrics["heldout_accuracy"] >= 0.9
    block = ClassifierFilter(ClassifierConfig(enabled=True, model=str(model_path)), str(tmp_path))
    kept, counts, _ = run_block(block, ["The old mill by the river ground the farmers' grain.",
                                        "buy cheap pills casino bonus free free", "农民把粮食带到磨坊。",
                                        "免费领取优惠券 赌场 奖金"], tmp_path)
    assert [d.id for d in kept] == ["0", "2"] and counts["removed/low_quality_score"] == 2


def test_shingles_are_characters_for_chinese_and_words_otherwise():
    assert shingles("天地玄黄，宇宙洪荒。", 5, 3)[:3] == ["天地玄", "地玄黄", "玄黄宇"]
    assert shingles("The quick brown fox jumps over", 3, 5)[0] == "the quick brown"
    assert shingles("短", 5, 5) == ["短"]  # shorter than n: one shingle of what there is


def test_minhash_signature_agreement_estimates_jaccard(tmp_path):
    """The verification step's estimate (share of equal MinHash values) tracks the true Jaccard similarity."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(2000)]
    base = list(rng.choice(vocab, 400))
    edited = list(base)
    for i in rng.choice(len(edited), 40, replace=False):
        edited[i] = str(rng.choice(vocab))
    cfg = DedupConfig(bands=16, rows=16)
    sig = CjkMinhashSignature(str(tmp_path), cfg)
    a, b = (" ".join(t) for t in (base, edited))
    sa, sb = (np.concatenate(sig.get_signature(sig.get_shingles(t))) for t in (a, b))
    true = jaccard(set(shingles(a, 5, 5)), set(shingles(b, 5, 5)))
    assert abs(float(np.mean(sa == sb)) - true) < 0.1
