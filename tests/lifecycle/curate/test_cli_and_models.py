"""`lmforge curate` from the command line, and the blocks that need a model or eval tasks: perplexity band
(a micro Llama trained here), decontamination (a task file of `lmforge eval` written here)."""

from __future__ import annotations

import json
import random

import pytest

from lifecycle.cli import main
from lifecycle.data.curate.config import CurateConfig, DecontamConfig, PerplexityConfig
from lifecycle.data.curate.perplexity import band_edges
from lifecycle.data.curate.step import read_counts
from lifecycle.errors import ConfigError

from .conftest import chinese_doc, english_doc, jsonl


def test_cli_run_writes_report_and_manifest(tmp_path, capsys):
    rng = random.Random(1)
    src = jsonl(tmp_path / "mixed.jsonl", [english_doc(rng) for _ in range(5)] + [chinese_doc(rng) for _ in range(5)])
    code = main(["curate", "run", str(src), "-o", str(tmp_path / "out"), "--disable", "dedup_near"])
    assert code == 0
    out = capsys.readouterr().out
    assert "10 documents read, 10 written" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["extra"]["curate"]["config"]["dedup"]["near"] is False
    assert (tmp_path / "out" / "report.md").is_file()


@pytest.mark.parametrize("config_text, needle", [
    ("dedup:\n  threshold: 1.5\n", "dedup.threshold"),
    ("langid:\n  languages: [en, xx]\n", "langid.languages"),
    ("quality:\n  colour: red\n", "unknown keys colour"),
    ("workers: 0\n", "workers"),
])
def test_bad_config_is_one_line_naming_the_field(tmp_path, capsys, config_text, needle):
    cfg = tmp_path / "curate.yaml"
    cfg.write_text(config_text)
    assert main(["curate", "run", str(tmp_path), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and "Traceback" not in err


def test_output_dir_apart_from_the_inputs_or_nothing_is_written(tmp_path, capsys):
    rng = random.Random(2)
    (tmp_path / "in").mkdir()
    src = jsonl(tmp_path / "in" / "a.jsonl", [english_doc(rng) for _ in range(3)])
    before = src.read_bytes()
    for inputs, output, needle in [
        (src, src, "exists and is not a directory"),  # a typo'd -o that names the input file
        (tmp_path / "in", tmp_path / "in" / "out", "inside the input directory"),  # read back on a rerun
        (tmp_path / "in", tmp_path / "in", "inside the input directory"),
        (src, tmp_path / "in", "holds the input"),  # shards beside (or over) the input
    ]:
        assert main(["curate", "run", str(inputs), "-o", str(output), "--disable", "dedup_near"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --output-dir") and needle in err and "Traceback" not in err
        assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.jsonl"] and src.read_bytes() == before


def test_config_checks_name_fields():
    with pytest.raises(ConfigError, match="perplexity.checkpoint"):
        PerplexityConfig(enabled=True)
    with pytest.raises(ConfigError, match="mix.weights\\[web\\]"):
        CurateConfig.from_dict({"mix": {"weights": {"web": 0}}})


def test_decontamination_drops_documents_quoting_an_eval_task(tmp_path):
    from lifecycle.data.curate.cli import curate

    question = ("Which gas do green plants take in from the air and use together with water and sunlight to make "
                "their own food during photosynthesis in the leaves")
    zh_question = "下列哪一个选项正确地描述了光合作用过程中植物叶片从空气中吸收并用来制造养分的气体成分"
    (tmp_path / "task_data.jsonl").write_text(
        json.dumps({"query": question, "choices": ["carbon dioxide", "oxygen"], "gold": 0}) + "\n" +
        json.dumps({"query": zh_question, "choices": ["二氧化碳", "氧气"], "gold": 0}, ensure_ascii=False) + "\n")
    (tmp_path / "mytask.yaml").write_text(
        "name: mytask\nkind: multiple_choice\ndata: task_data.jsonl\nprompt: \"{{query}}\\nAnswer:\"\n"
        "choices: choices\ngold: \"{{gold}}\"\n")
    rng = random.Random(2)
    clean = [english_doc(rng) for _ in range(4)] + [chinese_doc(rng) for _ in range(4)]
    leaked = [english_doc(rng) + " Quiz time. " + question + "? The answer is carbon dioxide.",
              chinese_doc(rng) + zh_question + "？答案是二氧化碳。"]
    src = jsonl(tmp_path / "train.jsonl", clean + leaked)
    config = CurateConfig(inputs=(str(src),), output_dir=str(tmp_path / "out"),
                          decontam=DecontamConfig(enabled=True, tasks=(str(tmp_path / "mytask.yaml"),)))
    manifest, _ = curate(config, show_progress=False)
    assert manifest.extra["curate"]["blocks"]["decontam"]["removed"] == {"overlaps_mytask": 2}
    assert manifest.num_documents == len(clean)


def test_band_edges_are_percentiles():
    assert band_edges([1, 2, 3, 4, 5, float("inf")], 0, 100) == (1.0, 5.0)
    assert band_edges(list(range(101)), 10, 90) == (10.0, 90.0)


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    """A micro Llama trained for a few steps on repetitive English, so fluent English scores lower."""
    import yaml

    from lifecycle.data.readers import iter_documents
    from lifecycle.recipes.pretrain import PretrainConfig, pretrain
    from lifecycle.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("ppl")
    rng = random.Random(3)
    corpus = jsonl(root / "train.jsonl", [english_doc(rng) for _ in range(150)])
    tok = train_tokenizer((d.text for d in iter_documents([corpus])), vocab_size=400, show_progress=False)
    save_tokenizer(tok, root / "tok")
    (root / "model.yaml").write_text(yaml.safe_dump(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, intermediate_size=160,
                                                         vocab_size=400, max_position_embeddings=256)))
    return pretrain(PretrainConfig(data=[str(corpus)], tokenizer=str(root / "tok"), model_config=str(root / "model.yaml"),
                                   seq_len=64, micro_batch_size=8, global_batch_size=8, max_steps=30,
                                   learning_rate=3e-3, warmup_steps=5, output_dir=str(root / "run"),
                                   eval_fraction=0.0, eval_every=0, save_every=0, log_every=1000, progress=False))


def test_perplexity_band_keeps_the_middle_and_scores_fluent_text_lower(tmp_path, micro_checkpoint):
    from datatrove.data import Document

    from lifecycle.data.curate.perplexity import PerplexityFilter, PerplexityScorer

    rng = random.Random(4)
    fluent = english_doc(rng)
    noise = " ".join("".join(rng.choice("qxzjvkwy") for _ in range(7)) for _ in range(40))
    scorer = PerplexityScorer(str(micro_checkpoint), max_tokens=128)
    ppl_fluent, ppl_noise = scorer([fluent, noise])
    assert ppl_fluent < ppl_noise
    texts = [english_doc(rng) for _ in range(18)] + [noise, "".join(rng.choice("xyz") for _ in range(300))]
    block = PerplexityFilter(PerplexityConfig(enabled=True, checkpoint=str(micro_checkpoint), low_percentile=0,
                                              high_percentile=90, calibration_docs=10, batch_size=4), str(tmp_path))
    kept = list(block.run(iter(Document(text=t, id=str(i), metadata={}) for i, t in enumerate(texts))))
    counts = read_counts(tmp_path, "perplexity")
    assert counts["in"] == 20 and counts["out"] == len(kept)
    assert "18" not in {d.id for d in kept}  # the noise is in the top decile
    assert counts["removed/high_perplexity"] >= 1 and all(d.metadata["perplexity"] > 0 for d in kept)


def test_pack_writes_token_blocks_with_the_project_tokenizer(tmp_path, tiny_tokenizer_dir):
    import numpy as np
    from transformers import AutoTokenizer

    from lifecycle.data.curate.cli import curate
    from lifecycle.data.curate.config import PackConfig

    rng = random.Random(6)
    docs = [english_doc(rng) for _ in range(6)]
    src = jsonl(tmp_path / "in.jsonl", docs)
    config = CurateConfig(inputs=(str(src),), output_dir=str(tmp_path / "out"),
                          pack=PackConfig(enabled=True, tokenizer=str(tiny_tokenizer_dir), seq_len=32))
    manifest, _ = curate(config, show_progress=False)
    blocks = np.fromfile(tmp_path / "out" / "packed" / "rank-00000.bin", dtype=np.int32).reshape(-1, 32)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    kept = [json.loads(line)["text"] for line in (tmp_path / "out" / "data" / "shard-00000-00000.jsonl").open()]
    stream = [t for text in kept for t in tok.backend_tokenizer.encode(text, add_special_tokens=False).ids +
              [tok.eos_token_id]]
    assert manifest.extra["curate"]["packed_blocks"] == len(blocks) == len(stream) // 32
    assert blocks.reshape(-1).tolist() == stream[: len(blocks) * 32]
    # with a tokenizer, token counts are that tokenizer's
    assert manifest.num_tokens == sum(len(tok.backend_tokenizer.encode(t, add_special_tokens=False).ids)
                                      for t in kept)
