"""The issue's accuracy goals on the real data in ../shared/data, on subsets small enough for the suite
(`lmforge bench curate` runs the full sets)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.shared_data


def test_langid_accuracy_on_lingua_sentences(shared_data):
    from lifecycle.data.curate.bench_data import langid_sentences
    from lifecycle.data.curate.config import LangIdConfig
    from lifecycle.data.curate.langid import LanguageId

    block = LanguageId(LangIdConfig(), ".")
    block.setup()
    by_lang: dict[str, list[str]] = {}
    for lang, text in langid_sentences(shared_data):
        by_lang.setdefault(lang, []).append(text)
    pairs = [(lang, t) for lang, texts in by_lang.items() for t in texts[:80]]
    accuracy = sum(block.detect(t)[0] == lang for lang, t in pairs) / len(pairs)
    assert len(by_lang) == 7 and accuracy >= 0.98


def test_pii_recall_on_presidio_and_chinese_sets(shared_data):
    from lifecycle.data.curate.bench import bench_pii

    result = bench_pii(shared_data)
    for kind, recall in {**result["presidio_recall"], **result["chinese_recall"]}.items():
        assert recall >= 0.95, (kind, recall)
    assert set(result["chinese_recall"]) == {"email", "phone", "ip", "bank_card", "cn_id"}
    assert sum(result["clean_text_false_positives"].values()) <= 5


def test_near_duplicate_precision_and_recall(shared_data, tmp_path):
    from lifecycle.data.curate.bench import bench_dedup

    result = bench_dedup(shared_data, tmp_path, max_docs=400)
    assert result["planted_near"] >= 60
    assert result["recall_near"] >= 0.95 and result["recall_exact"] == 1.0 and result["precision"] >= 0.99
