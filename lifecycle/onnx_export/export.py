"""`lmforge export --format onnx`: a checkpoint -> an ONNX decoder directory that is a checkpoint too.

Steps, each under the progress bar, all inside a hidden temporary directory beside the output (published by
rename only when every check passed, so a failed export leaves nothing under the output's name):

 1. trace the fp32 model into model.onnx (graph.py: KV cache as inputs/outputs, dynamic shapes);
 2. parity, fp32: greedy decoding through the ONNX graph's KV cache and through transformers on the same prompts;
    the tokens must be identical (else the export fails) and max |Δlogit| is recorded;
 3. precision (quantize.py): fp16 and/or int8 / int4 from the fp32 graph; the changed model's greedy agreement
    and max |Δlogit| against transformers are recorded, and its perplexity on held-out text next to the fp32
    model's (as `lmforge quantize` reports it: the checkpoint's own held-out documents, or --eval-data);
 4. genai_config.json, then onnxruntime-genai's Generator must load the directory and decode the parity
    prompt to the same tokens as plain onnxruntime;
 5. config.json, generation_config.json and the tokenizer files of the source, and manifest.json: parent,
    opset, quantization, parity and perplexity metrics, sha256 of every file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lifecycle.errors import CheckpointError, ConfigError, DataError, LmforgeError
from lifecycle.onnx_export import graph, quantize
from lifecycle.onnx_export.runner import OnnxDecoder, torch_greedy

KIND = "onnx"
DEFAULT_OPSET = 18
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


class ParityError(LmforgeError):
    """The exported graph does not reproduce the source model; nothing was published."""


@dataclass
class OnnxExportConfig:
    checkpoint: str
    output: str
    dtype: str = "fp32"
    quantize: str | None = None
    opset: int = DEFAULT_OPSET
    parity_prompts: int = 4
    parity_tokens: int = 32
    prompt_len: int = 16
    eval_data: list[str] = field(default_factory=list)
    eval_seq_len: int = 128
    eval_blocks: int = 8
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in quantize.DTYPES:
            raise ConfigError(f"--dtype: must be one of {', '.join(quantize.DTYPES)}, got {self.dtype!r}")
        if self.quantize not in (None, *quantize.QUANTIZATIONS):
            raise ConfigError(f"--quantize: must be one of {', '.join(quantize.QUANTIZATIONS)}, got {self.quantize!r}")
        if self.quantize and self.dtype != "fp32":
            raise ConfigError(f"--quantize {self.quantize} with --dtype {self.dtype}: quantized exports compute in fp32; "
                              "drop --dtype")
        if not 14 <= self.opset <= 23:
            raise ConfigError(f"--opset: torch.onnx's dynamo exporter writes opsets 14..23, got {self.opset}")
        for name in ("parity_prompts", "parity_tokens", "prompt_len", "eval_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.eval_seq_len < 2:
            raise ConfigError(f"--eval-seq-len: must be >= 2, got {self.eval_seq_len}")
        for path in self.eval_data:
            if not Path(path).is_file():
                raise ConfigError(f"--eval-data: {path} is not a file")


def export_onnx(cfg: OnnxExportConfig) -> tuple[Path, dict[str, Any]]:
    """Run the whole export; returns (output directory, manifest metrics)."""
    import torch
    from tqdm.auto import tqdm

    from lifecycle.checkpoint import load_checkpoint, publish_directory

    out_dir, src_dir = Path(cfg.output), Path(cfg.checkpoint)
    if out_dir.exists() and not cfg.overwrite:
        raise CheckpointError(f"{out_dir}: already exists; pass --overwrite to replace it")
    if out_dir.resolve() == src_dir.resolve():
        raise ConfigError(f"--output {out_dir}: is the source checkpoint; choose another directory")
    from lifecycle.onnx_export.verify import is_onnx_export

    if is_onnx_export(src_dir):  # before load_checkpoint, which would only say it has no safetensors
        raise ConfigError(f"{src_dir}: is an ONNX export already; export its parent checkpoint")
    src = load_checkpoint(src_dir)  # verifies hashes; refuses unsupported architectures naming config.json
    if src.quantization:
        raise ConfigError(f"{src_dir / 'config.json'}: the checkpoint is quantized ({src.quantization.get('quant_method') or src.quantization.get('method')}); "
                          "export its fp32/bf16 parent and pass --quantize int8|int4")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    steps = ["trace", "parity fp32"] + (["precision", "drift", "perplexity"] if _changes_precision(cfg) else []) + \
        ["genai check", "manifest"]
    bar = tqdm(total=len(steps), desc="export onnx", unit="step", disable=not cfg.progress)
    try:
        model = src.load_model(dtype=torch.float32).eval()
        tokenizer = src.load_tokenizer()
        metrics: dict[str, Any] = {}
        bar.set_postfix_str("trace")
        path = graph.export_decoder(model, tmp, opset=cfg.opset)
        bar.update()
        prompts = _parity_prompts(src, tokenizer, cfg)
        bar.set_postfix_str("parity")
        metrics["parity_fp32"] = _parity(OnnxDecoder(path, src.config), model, prompts, cfg.parity_tokens)
        if metrics["parity_fp32"]["identical_fraction"] < 1.0:
            raise ParityError(f"{src_dir}: the exported fp32 graph's greedy tokens differ from transformers' on "
                              f"{_differing(metrics['parity_fp32'])} (max |Δlogit| "
                              f"{metrics['parity_fp32']['max_abs_logit_diff']:.3g}); nothing was written")
        bar.update()
        if _changes_precision(cfg):
            blocks = _eval_blocks(src, tokenizer, cfg)  # before the slow steps: a missing text fails fast
            bar.set_postfix_str(cfg.quantize or cfg.dtype)
            path = quantize.apply(path, tmp, dtype=cfg.dtype, quantize=cfg.quantize)
            bar.update()
            changed = OnnxDecoder(path, src.config)
            metrics["drift"] = _parity(changed, model, prompts, cfg.parity_tokens)
            bar.update()
            metrics["perplexity"] = _perplexity(model, changed, blocks, cfg.progress)
            bar.update()
        graph.write_genai_config(tmp, src.config, _generation(src_dir))
        metrics["genai_greedy_identical"] = _genai_check(tmp, path, src.config, prompts[0])
        bar.update()
        for name in COPIED_FILES:
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, tmp / name)
        _write_manifest(tmp, cfg, src, model, metrics, path)
        bar.update()
        publish_directory(tmp, out_dir)  # --overwrite: the old directory is swapped out by rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return out_dir, metrics


def _changes_precision(cfg: OnnxExportConfig) -> bool:
    return cfg.quantize is not None or cfg.dtype != "fp32"


def _parity_prompts(src: Any, tokenizer: Any, cfg: OnnxExportConfig) -> list[list[int]]:
    """Windows of the checkpoint's held-out text (real text keeps greedy margins real), else seeded random ids."""
    from quant import calibration

    try:
        stream = calibration.token_stream(tokenizer, calibration.heldout_texts(src))
    except Exception:  # noqa: BLE001 - a checkpoint without recorded training data: random prompts below
        stream = []
    n, length = cfg.parity_prompts, cfg.prompt_len
    if len(stream) >= n * length:
        step = len(stream) // n
        return [[int(t) for t in stream[i * step:i * step + length]] for i in range(n)]
    rng = random.Random(0)
    return [[rng.randrange(src.config["vocab_size"]) for _ in range(length)] for _ in range(n)]


def _parity(decoder: OnnxDecoder, model: Any, prompts: list[list[int]], num_tokens: int) -> dict[str, Any]:
    """Greedy tokens of both on each prompt; logits compared over the steps where both saw the same tokens."""
    import numpy as np

    identical, prefix, total, max_diff = 0, 0, 0, 0.0
    first_difference: list[int | None] = []
    for prompt in prompts:
        ours, our_logits = decoder.greedy(prompt, num_tokens)
        theirs, their_logits = torch_greedy(model, prompt, num_tokens)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), num_tokens)
        # Step i's logits depend on tokens < i only: compared up to and including the first differing step.
        upto = min(same + 1, num_tokens)
        max_diff = max(max_diff, float(np.abs(our_logits[:upto] - their_logits[:upto]).max()))
        identical += same == num_tokens
        prefix += same
        total += num_tokens
        first_difference.append(None if same == num_tokens else same)
    return {"num_prompts": len(prompts), "num_tokens": num_tokens, "identical_fraction": identical / len(prompts),
            "prefix_fraction": prefix / total, "max_abs_logit_diff": max_diff, "first_difference": first_difference}


def _differing(parity: dict[str, Any]) -> str:
    bad = [f"prompt {i} from token {d}" for i, d in enumerate(parity["first_difference"]) if d is not None]
    return ", ".join(bad)


def _eval_blocks(src: Any, tokenizer: Any, cfg: OnnxExportConfig):
    from quant import calibration

    max_len = int(src.config.get("max_position_embeddings") or cfg.eval_seq_len)
    seq_len = min(cfg.eval_seq_len, max_len)
    if cfg.eval_data:
        texts, source = calibration.file_texts(cfg.eval_data), ", ".join(cfg.eval_data)
    else:
        try:
            texts, source = calibration.heldout_texts(src), f"{src.path} held-out data"
        except Exception as err:  # noqa: BLE001 - no recorded training data
            raise DataError(f"{src.path}: no held-out text for the perplexity of a {cfg.quantize or cfg.dtype} "
                            f"export ({err}); pass --eval-data FILE") from None
    return calibration.eval_blocks(tokenizer, texts, seq_len=seq_len, max_blocks=cfg.eval_blocks, source=source)


def _perplexity(model: Any, decoder: OnnxDecoder, blocks: Any, progress: bool) -> dict[str, Any]:
    from quant.report import perplexity

    before = perplexity(model, blocks, desc="perplexity (transformers fp32)", progress=progress)
    after = decoder.perplexity(blocks.numpy(), progress=progress)
    return {"before": before, "after": after, "relative_change": after / before - 1,
            "num_blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1])}


def _generation(src_dir: Path) -> dict[str, Any]:
    path = src_dir / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _genai_check(out_dir: Path, onnx_path: Path, config: dict[str, Any], prompt: list[int]) -> bool:
    """onnxruntime-genai loads the directory (genai_config.json) and its Generator decodes like plain onnxruntime."""
    from serve.backends.onnxruntime_engine import open_genai_model

    expected, _ = OnnxDecoder(onnx_path, config).greedy(prompt, 8)
    model = open_genai_model(out_dir)
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 8)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    got = []
    for _ in range(8):
        got.append(int(generator.get_logits()[0, -1].argmax()))
        generator.append_tokens([got[-1]])
    if got != expected:
        raise ParityError(f"{out_dir / graph.GENAI_CONFIG_NAME}: onnxruntime-genai decodes {got} where onnxruntime "
                          f"decodes {expected}; nothing was written")
    return True


def _write_manifest(tmp: Path, cfg: OnnxExportConfig, src: Any, model: Any, metrics: dict[str, Any],
                    onnx_path: Path) -> None:
    import onnx
    import onnxruntime
    import onnxruntime_genai
    import torch

    from lifecycle import __version__
    from lifecycle.checkpoint import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, _hash_files, git_revision

    proto = onnx.load(str(onnx_path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": KIND,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "lmforge_version": __version__, "git_revision": git_revision(), "recipe": "export-onnx",
        "recipe_config": asdict(cfg), "parent": src.reference(),
        "dataset_manifest_hash": (src.manifest or {}).get("dataset_manifest_hash"),
        "model": {"architecture": type(model).__name__, "num_parameters": sum(p.numel() for p in model.parameters()),
                  "dtype": {"fp32": "float32", "fp16": "float16"}[cfg.dtype]},
        "onnx": {"file": graph.WEIGHTS_NAME, "opset": opset, "ir_version": proto.ir_version,
                 "inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output],
                 "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=True)",
                 "runtimes": {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": onnxruntime_genai.__version__},
                 "genai_config": graph.GENAI_CONFIG_NAME},
        "quantization": quantize.quantization_config(cfg.quantize, cfg.dtype),
        "metrics": metrics, "extra": {}, "files": _hash_files(tmp),
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def load_onnx_export(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """An export's directory, manifest and config.json, every file verified against the manifest."""
    from lifecycle.checkpoint import MANIFEST_NAME, verify_files

    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not (path / graph.WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{path}: not an ONNX export ({graph.WEIGHTS_NAME} is missing); "
                              "make one with `lmforge export --format onnx CHECKPOINT -o DIR`")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST_NAME}; re-create the export with `lmforge export --format onnx`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND or "files" not in manifest:
        raise CheckpointError(f"{manifest_path}: not the manifest of an ONNX export (kind {KIND!r})")
    verify_files(path, manifest["files"])
    return path, manifest, json.loads((path / "config.json").read_text())
