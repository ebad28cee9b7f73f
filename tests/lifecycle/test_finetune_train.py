"""SFT / reward / DPO / export on a micro Llama trained here: the "Done when" list of issue 6."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.lifecycle.conftest import WORDS

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, tiny_tokenizer_dir, micro_model_config):
    from transformers import LlamaForCausalLM

    from lifecycle.checkpoint import save_checkpoint
    from lifecycle.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(micro_model_config.to_hf(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                      pad_token_id=tok.pad_token_id))
    return save_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", model, tok, recipe="test", recipe_config={}).path


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    lines = [json.dumps({"instruction": f"say {w}", "output": f"{w} {w}"}) for w in
             (rng.choice(WORDS) for _ in range(80))]
    lines.insert(5, json.dumps({"instruction": "no output here"}))  # one bad record: counted, not fatal
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
    """Learnable: the chosen answer repeats the asked word, the rejected one is always filler."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("pref") / "pref.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {w}", "chosen": f"{w} {w}", "rejected": "the the the"}) + "\n"
                            for w in (rng.choice(WORDS) for _ in range(96))))
    return path


def _common(tmp_path, name, **kw):
    return dict(output_dir=str(tmp_path / name), max_len=64, micro_batch_size=4, global_batch_size=4,
                eval_fraction=0.15, progress=False, **kw)


def _metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_exact_resume_and_manifest(tmp_path, base_ckpt, sft_file):
    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.recipes.sft import SFTRecipeConfig, sft

    kw = dict(init_from=str(base_ckpt), data=[f"{sft_file}:1"], max_steps=4, save_every=2, eval_every=2,
              learning_rate=3e-3)
    straight = load_checkpoint(sft(SFTRecipeConfig(**_common(tmp_path, "a"), **kw)))
    sft(SFTRecipeConfig(**_common(tmp_path, "b"), stop_at_step=2, **kw))
    assert not (tmp_path / "b" / "final").exists()
    resumed = load_checkpoint(sft(SFTRecipeConfig(**_common(tmp_path, "b"), **kw)))
    losses = lambda d: [(r["step"], r["loss"]) for r in _metrics(d) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 4
    from safetensors.torch import load_file

    a, b = load_file(straight.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    m = straight.manifest
    assert m["recipe"] == "sft" and m["parent"]["path"] == str(base_ckpt.resolve())
    data = m["extra"]["dataset_manifest"]
    assert m["dataset_manifest_hash"] == data["content_hash"]
    assert data["removed"] == {"not a alpaca record": 1} and data["extra"]["bad_records"] == 1
    mix = data["extra"]["mix"][0]
    assert mix["examples_used"] == data["extra"]["train_examples"] > 0 and mix["tokens_used"] > 0
    assert "eval_loss" in m["metrics"] and (tmp_path / "a" / "curves.png").is_file()


def test_nan_guard_stops_with_last_good_checkpoint(tmp_path, base_ckpt, sft_file, monkeypatch):
    from lifecycle.recipes import posttrain
    from lifecycle.recipes.posttrain import NonFiniteLoss
    from lifecycle.recipes.sft import SFTRecipeConfig, sft

    real = posttrain.load_base
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, inputs, output):  # from the 4th training forward (step 4) on, NaN embeddings
            if module.training:
                calls["n"] += 1
                if calls["n"] >= 4:
                    return output * float("nan")
            return output

        model.get_input_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(posttrain, "load_base", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 4.*checkpoint-2"):
        sft(SFTRecipeConfig(**_common(tmp_path, "nan"), init_from=str(base_ckpt), data=[str(sft_file)], max_steps=6,
                            save_every=2, eval_every=0, learning_rate=1e-3))
    assert not (tmp_path / "nan" / "trainer" / "checkpoint-4").exists()
    assert not (tmp_path / "nan" / "final").exists()


def test_packing_has_no_cross_example_attention(base_ckpt):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from lifecycle.checkpoint import load_checkpoint

    model = load_checkpoint(base_ckpt).load_model(dtype=torch.float32).eval()
    a, b = list(range(5, 17)), list(range(40, 49))
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": a}, {"input_ids": b}])
    with torch.no_grad():
        # use_cache=False as SFTTrainer.compute_loss passes it: with a cache, transformers does not look for
        # packed sequences in the position ids.
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       use_cache=False).logits  # (1, 21, vocab)
        alone_b = model(input_ids=torch.tensor([b])).logits  # (1, 9, vocab)
    torch.testing.assert_close(logits[:, len(a):], alone_b, atol=1e-5, rtol=1e-5)


def test_reward_model_learns_a_synthetic_preference_and_scores(tmp_path, base_ckpt, pref_file):
    from lifecycle.recipes.reward import RewardRecipeConfig, score_file, train_reward

    final = train_reward(RewardRecipeConfig(**_common(tmp_path, "rm"), init_from=str(base_ckpt), data=[str(pref_file)],
                                            max_steps=12, eval_every=0, learning_rate=3e-3))
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["metrics"]["eval_accuracy"] > 0.8  # chance is 0.5
    pairs = tmp_path / "score.jsonl"
    pairs.write_text(json.dumps({"prompt": "say model", "response": "model model"}) + "\n"
                     + json.dumps({"prompt": "say model", "response": "the the the"}) + "\n")
    good, bad = score_file(final, pairs)
    assert good["score"] > bad["score"] and good["line"] == 1


def test_dpo_increases_margin_and_caches_reference(tmp_path, base_ckpt, pref_file, capsys):
    from lifecycle.recipes.dpo import DPORecipeConfig, dpo

    kw = dict(init_from=str(base_ckpt), data=[str(pref_file)], max_steps=8, eval_every=0, learning_rate=2e-3)
    final = dpo(DPORecipeConfig(**_common(tmp_path, "dpo"), **kw))
    records = _metrics(tmp_path / "dpo")
    # policy == reference at step 1, so the first margin is 0; training pushes chosen above rejected.
    assert abs(records[0]["rewards/margins"]) < 1e-4
    assert records[-1]["eval_rewards/margins"] > 0.05 and records[-1]["eval_rewards/accuracies"] > 0.8
    from safetensors.torch import load_file, save_file

    ref_dir = tmp_path / "dpo" / "ref_logps"
    (train_cache,), (eval_cache,) = ref_dir.glob("train-*[0-9a-f].safetensors"), ref_dir.glob("eval-*.safetensors")
    full = load_file(train_cache)
    assert len(full["chosen"]) > 4
    # A pass killed after its first batch left a partial file: the rerun keeps those rows (marked here by
    # +1000, so recomputing them would show) and computes only the rest.
    save_file({k: (v[:4] + 1000).contiguous() for k, v in full.items()},
              str(train_cache.with_name(train_cache.name.replace(".safetensors", ".partial.safetensors"))))
    train_cache.unlink()
    eval_stamp = eval_cache.stat().st_mtime_ns
    capsys.readouterr()
    dpo(DPORecipeConfig(**_common(tmp_path, "dpo"), **kw))  # rerun: resumes at the end of training
    again = load_file(train_cache)
    for key in ("chosen", "rejected"):
        torch.testing.assert_close(again[key][:4], full[key][:4] + 1000)
        torch.testing.assert_close(again[key][4:], full[key][4:], atol=1e-4, rtol=1e-5)
    assert not list(ref_dir.glob("*.partial.safetensors"))
    assert eval_cache.stat().st_mtime_ns == eval_stamp and "for eval: cached in" in capsys.readouterr().out
    assert json.loads((final / "manifest.json").read_text())["extra"]["loss_type"] == "sigmoid"


def test_lora_merge_parity_and_qlora_on_cpu(tmp_path, base_ckpt, sft_file):
    from peft import PeftModel

    from lifecycle.checkpoint import load_checkpoint
    from lifecycle.export import export_merged
    from lifecycle.recipes.sft import SFTRecipeConfig, sft

    adapter = sft(SFTRecipeConfig(**_common(tmp_path, "lora"), init_from=str(base_ckpt), data=[str(sft_file)],
                                  lora=True, lora_r=4, lora_target_modules=["q_proj", "v_proj", "down_proj"],
                                  max_steps=3, eval_every=0, learning_rate=1e-2))
    merged_path, diff = export_merged(adapter, tmp_path / "merged")
    assert diff <= 1e-4
    base = load_checkpoint(base_ckpt).load_model(dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    merged = load_checkpoint(merged_path).load_model(dtype=torch.float32).eval()
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        expected, got = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = load_checkpoint(base_ckpt).load_model(dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the adapter did change the model

    qlora = sft(SFTRecipeConfig(**_common(tmp_path, "qlora"), init_from=str(base_ckpt), data=[str(sft_file)],
                                qlora=True, lora_r=4, max_steps=2, eval_every=0, learning_rate=1e-3))
    assert (qlora / "adapter_model.safetensors").is_file()
    assert all(r["loss"] == r["loss"] for r in _metrics(tmp_path / "qlora") if "loss" in r)


def test_bad_input_is_one_clear_line(tmp_path, base_ckpt, capsys):
    from lifecycle.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x"}) + "\n")
    assert main(["sft", "--init-from", str(base_ckpt), "--data", str(bad), "--strict", "--output-dir",
                 str(tmp_path / "o")]) == 2
    assert f"{bad}:1: not a alpaca record: missing \"output\"" in capsys.readouterr().err
    assert main(["dpo", "--init-from", str(base_ckpt), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["sft", "--data", str(bad)]) == 2
    assert "--init-from" in capsys.readouterr().err
    # An output directory that is the checkpoint being fine-tuned (the run would write among its files) or a file
    files = sorted(p.name for p in base_ckpt.iterdir())
    for stage in ("sft", "reward", "dpo"):
        assert main([stage, "--init-from", str(base_ckpt), "--data", str(bad), "--output-dir", str(base_ckpt)]) == 2
        assert "is the checkpoint this command reads" in capsys.readouterr().err
    assert main(["sft", "--init-from", str(base_ckpt), "--data", str(bad), "--output-dir", str(bad)]) == 2
    assert f"--output-dir {bad}: exists and is not a directory" in capsys.readouterr().err
    assert sorted(p.name for p in base_ckpt.iterdir()) == files


# ------------------------------------------------------------------ resume exactness of reward and DPO


def _stop_and_resume(tmp_path, run, cfg_cls, **kw):
    """An uninterrupted run and a run stopped at step 2 then rerun: same losses, same final weights."""
    from safetensors.torch import load_file

    straight = run(cfg_cls(**_common(tmp_path, "a"), **kw))
    assert run(cfg_cls(**_common(tmp_path, "b"), stop_at_step=2, **kw)).name == "trainer"
    assert not (tmp_path / "b" / "final").exists() and (tmp_path / "b" / "trainer" / "checkpoint-2").is_dir()
    resumed = run(cfg_cls(**_common(tmp_path, "b"), **kw))
    losses = lambda d: [(r["step"], r["loss"]) for r in _metrics(d) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == kw["max_steps"]
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight, resumed


def test_reward_exact_resume(tmp_path, base_ckpt, pref_file):
    from lifecycle.recipes.reward import RewardRecipeConfig, train_reward

    straight, _ = _stop_and_resume(tmp_path, train_reward, RewardRecipeConfig, init_from=str(base_ckpt),
                                   data=[str(pref_file)], max_steps=4, save_every=2, eval_every=2,
                                   learning_rate=3e-3, margin=0.5)
    # the new scalar head is seeded by --seed: both runs started from the same head, and it was trained
    assert json.loads((straight / "manifest.json").read_text())["recipe"] == "reward"


def test_dpo_exact_resume(tmp_path, base_ckpt, pref_file):
    from lifecycle.recipes.dpo import DPORecipeConfig, dpo

    _stop_and_resume(tmp_path, dpo, DPORecipeConfig, init_from=str(base_ckpt), data=[str(pref_file)], max_steps=4,
                     save_every=2, eval_every=2, learning_rate=2e-3)
    # the resumed run read the reference log-probs the stopped one cached, and both runs cached the same ones
    from safetensors.torch import load_file

    for name in ("train", "eval"):
        (a,), (b,) = [list((tmp_path / d / "ref_logps").glob(f"{name}-*.safetensors")) for d in ("a", "b")]
        ta, tb = load_file(a), load_file(b)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


# ------------------------------------------------------------------------------- DPO loss types


def test_dpo_loss_types_are_the_ones_trl_implements():
    import inspect
    import re

    import trl.trainer.dpo_trainer as dpo_trainer

    from lifecycle.recipes.dpo import LOSS_TYPES, DPORecipeConfig
    from lifecycle.errors import ConfigError

    assert set(LOSS_TYPES) == set(re.findall(r'loss_type == "(\w+)"', inspect.getsource(dpo_trainer)))
    with pytest.raises(ConfigError, match="--loss-type 'kto'.*ipo"):
        DPORecipeConfig(init_from="x", data=["d"], loss_type="kto")
    with pytest.raises(ConfigError, match="exo_pair needs --label-smoothing"):
        DPORecipeConfig(init_from="x", data=["d"], loss_type="exo_pair")


# The families of TRL's losses besides sigmoid (tested above): squared (IPO), hinge (SLiC), label-noise-robust,
# length-normalized sigmoid, pair classification (NCA, BCO, SPPO), anchored (APO), optimal transport (AOT),
# EXO (reverse KL). Left out of the margin claim: `sft` (NLL of the chosen answer, no preference term),
# `apo_down`/`aot_unpaired` (variants of those tested), and `discopop`: its loss is non-convex near 0 (with
# TRL's tau 0.05 the gradient pushes beta*margin further down once it is below about -0.05; the DiscoPOP
# paper notes the non-convexity), and in this setting its eval margin ended at -0.12 after 6 steps.
@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "robust", "sigmoid_norm", "nca_pair", "bco_pair",
                                       "sppo_hard", "apo_zero", "aot", "exo_pair"])
def test_dpo_loss_type_raises_the_margin(tmp_path, base_ckpt, pref_file, loss_type):
    from lifecycle.recipes.dpo import DPORecipeConfig, dpo

    # ipo's loss is (margin - 1/(2 beta))^2: a larger beta keeps its target margin within reach of 6 steps
    beta = 1.0 if loss_type == "ipo" else 0.1
    final = dpo(DPORecipeConfig(**_common(tmp_path, loss_type), init_from=str(base_ckpt), data=[str(pref_file)],
                                max_steps=6, eval_every=0, learning_rate=2e-3, loss_type=loss_type, beta=beta,
                                label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0))
    records = _metrics(tmp_path / loss_type)
    assert abs(records[0]["rewards/margins"]) < 1e-4  # policy == reference at step 1
    assert records[-1]["eval_rewards/margins"] > 0.01, records[-1]
    assert json.loads((final / "manifest.json").read_text())["extra"]["loss_type"] == loss_type


def test_reward_trains_bare_and_as_train_and_scores_as_score(capsys):
    from lifecycle.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["reward", "--data", "p.jsonl", "--init-from", "m"]).reward_action is None
    assert parser.parse_args(["reward", "train", "--data", "p.jsonl"]).reward_action == "train"
    assert parser.parse_args(["reward", "score", "--model", "m", "--data", "a.jsonl"]).reward_action == "score"
    for argv in (["reward", "--data", "p.jsonl"], ["reward", "train", "--data", "p.jsonl"]):
        assert main(argv) == 2  # the training config was built, and asks for its checkpoint
        assert "--init-from" in capsys.readouterr().err


def test_bench_sft_interleaves_legs_and_reports_the_median_ratio(tmp_path, base_ckpt, sft_file):
    from lifecycle.recipes.bench_finetune import BenchFinetuneConfig, bench_finetune

    out = tmp_path / "bench.json"
    report = bench_finetune("sft", BenchFinetuneConfig(init_from=str(base_ckpt), data=[str(sft_file)], steps=3,
                                                       warmup_steps=1, micro_batch_size=2, global_batch_size=4,
                                                       max_len=64, repeats=2, output=str(out)))
    assert json.loads(out.read_text())["overhead_pct"] == report["overhead_pct"]
    assert [r["order"] for r in report["rounds"]] == [["lmforge", "plain_trl"], ["plain_trl", "lmforge"]]
    ratios = [r["lmforge"]["median_s_per_step"] / r["plain_trl"]["median_s_per_step"] for r in report["rounds"]]
    assert report["ratios"] == ratios and report["median_ratio"] == pytest.approx(sum(ratios) / 2)
    assert report["overhead_pct"] == pytest.approx(100 * (sum(ratios) / 2 - 1))
    # the same examples in the same order: both legs end on the same loss, in every round
    for r in report["rounds"]:
        assert r["lmforge"]["final_loss"] == pytest.approx(r["plain_trl"]["final_loss"], rel=1e-4)


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_nan_guard_stops_reward_and_dpo(tmp_path, base_ckpt, pref_file, monkeypatch, stage):
    """The guard of the SFT test above, on the other two trainers (their losses and logs differ)."""
    import re

    from lifecycle.recipes import posttrain
    from lifecycle.recipes.posttrain import NonFiniteLoss

    real = posttrain.load_base
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, inputs, output):  # from the 3rd training forward on (not reference or eval passes)
            if module.training and torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] >= 3:
                    return output * float("nan")
            return output

        model.get_input_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(posttrain, "load_base", poisoned)
    kw = dict(**_common(tmp_path, stage), init_from=str(base_ckpt), data=[str(pref_file)], max_steps=6, save_every=1,
              eval_every=0, learning_rate=1e-3)
    if stage == "reward":
        from lifecycle.recipes.reward import RewardRecipeConfig, train_reward

        run = lambda: train_reward(RewardRecipeConfig(**kw))  # noqa: E731
    else:
        from lifecycle.recipes.dpo import DPORecipeConfig, dpo

        run = lambda: dpo(DPORecipeConfig(**kw))  # noqa: E731
    with pytest.raises(NonFiniteLoss) as info:
        run()
    found = re.search(r"loss became nan at step (\d+).*Last good checkpoint: (\S+);", str(info.value))
    assert found, str(info.value)
    step, last = int(found.group(1)), found.group(2)
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / stage / "trainer").glob("checkpoint-*"))
    assert 2 <= step <= 3 and saved and max(saved) < step and last.endswith(f"checkpoint-{max(saved)}")
    assert not (tmp_path / stage / "final").exists()
