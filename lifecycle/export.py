"""LoRA adapters as run outputs, and `lmforge export`: merge an adapter into its base, verify, write a checkpoint.

A LoRA run's `final/` is a PEFT adapter directory (adapter_config.json, adapter_model.safetensors, tokenizer)
with an lmforge manifest like a checkpoint's (recipe, parent = the base checkpoint, dataset manifest hash,
sha256 of every file). `export_merged` loads the base named in that manifest, applies the adapter, merges
(W + scale * B @ A, peft's merge_and_unload), checks on a fixed batch that the merged model's logits equal
the base+adapter model's within `atol`, and only then writes a normal checkpoint whose parent is the adapter.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from lifecycle.errors import CheckpointError, ConfigError, LmforgeError

ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(out_dir: Path, model: Any, tokenizer: Any, *, recipe: str, recipe_config: dict[str, Any],
                 parent: Any, dataset_manifest_hash: str | None, metrics: dict[str, Any],
                 extra: dict[str, Any]) -> Path:
    """Write a PEFT adapter + tokenizer + lmforge manifest atomically (tmp dir, then rename)."""
    from lifecycle import __version__
    from lifecycle.checkpoint import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, _hash_files, git_revision,
                                      publish_directory)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": "lora-adapter",
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "lmforge_version": __version__, "git_revision": git_revision(), "recipe": recipe,
            "recipe_config": recipe_config, "parent": parent.reference(),
            "dataset_manifest_hash": dataset_manifest_hash,
            "model": {"architecture": type(model).__name__, "num_trainable_parameters": trainable},
            "quantization": None, "metrics": metrics, "extra": extra, "files": _hash_files(tmp),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        publish_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_adapter_manifest(path: Path) -> dict[str, Any]:
    """The adapter directory's manifest, every file verified against it."""
    from lifecycle.checkpoint import MANIFEST_NAME, verify_files

    if not (path / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{path}: not a LoRA adapter ({ADAPTER_CONFIG} is missing)")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST_NAME}; pass --base for an adapter not written by lmforge")
    manifest = json.loads(manifest_path.read_text())
    verify_files(path, manifest["files"])
    return manifest


def export_merged(adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None, atol: float = 1e-4,
                  overwrite: bool = False) -> tuple[Path, float]:
    """Merge `adapter_dir` into its base and save a checkpoint; returns (path, max |logit difference|)."""
    import torch
    from peft import PeftModel

    from lifecycle.checkpoint import load_checkpoint, save_checkpoint

    adapter_dir = Path(adapter_dir)
    manifest = load_adapter_manifest(adapter_dir) if base is None else None
    base_path = base or (manifest or {}).get("parent", {}).get("path")
    if not base_path:
        raise CheckpointError(f"{adapter_dir}: the manifest names no base checkpoint; pass --base")
    parent = load_checkpoint(base_path)
    if manifest is not None and manifest["parent"].get("manifest_sha256") not in (None, parent.manifest_sha256()):
        raise CheckpointError(f"{base_path}: changed since the adapter was trained (manifest sha256 differs); "
                              "pass --base to merge into another base deliberately")
    model = PeftModel.from_pretrained(parent.load_model(dtype=torch.float32), adapter_dir, is_trainable=False)
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))  # (batch, seq)
    with torch.no_grad():
        expected = model(input_ids=ids).logits  # (batch, seq, vocab): base + scale * B @ A applied on the fly
        merged = model.merge_and_unload()
        got = merged(input_ids=ids).logits
    diff = float((expected - got).abs().max())
    if not diff <= atol:
        raise LmforgeError(f"merged logits differ from base+adapter logits by {diff:.3g} > --atol {atol}; "
                           "not writing the merged checkpoint")
    tokenizer = parent.load_tokenizer() if not (adapter_dir / "tokenizer.json").is_file() else \
        _load_tokenizer(adapter_dir)
    adapter_ref = type("AdapterRef", (), {"reference": lambda self: {
        "path": str(adapter_dir.resolve()), "recipe": (manifest or {}).get("recipe"),
        "manifest_sha256": _sha(adapter_dir / "manifest.json")}})()
    merged.config.use_cache = True
    saved = save_checkpoint(out_dir, merged, tokenizer, recipe="export-lora-merge",
                            recipe_config={"adapter": str(adapter_dir), "base": str(parent.path), "atol": atol},
                            parent=adapter_ref, dataset_manifest_hash=(manifest or {}).get("dataset_manifest_hash"),
                            metrics={"max_abs_logit_diff": diff},
                            extra={"base": parent.reference(), "adapter_recipe": (manifest or {}).get("recipe")},
                            overwrite=overwrite)
    return saved.path, diff


def _sha(path: Path) -> str | None:
    from lifecycle.data.manifest import sha256_file

    return sha256_file(path) if path.is_file() else None


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def add_command(sub: Any) -> None:
    from lifecycle.cli import add_subcommand

    parser = add_subcommand(
        sub, "export", help="merge a LoRA adapter into its base (logit parity checked), or export a checkpoint to ONNX",
        description=("Merge a LoRA adapter (the final/ of `lmforge sft --lora`, reward or dpo) into the base checkpoint "
                     "named in its manifest, check that the merged model's logits equal base+adapter's within "
                     "--atol, and write a checkpoint any stage (serve, quant) can load. With --format onnx: export "
                     "a checkpoint to an ONNX decoder with KV cache (+ genai_config.json for onnxruntime-genai), "
                     "greedy parity against transformers checked, optionally fp16 / int8 / int4 "
                     "(lifecycle/onnx_export/)."),
        example="lmforge export runs/sft-lora/final --output runs/sft-merged\n"
                "  lmforge export --format onnx runs/small/final -o runs/small-onnx-int4 --quantize int4")
    parser.add_argument("adapter", help="LoRA adapter directory (--format onnx: the checkpoint to export)")
    parser.add_argument("--format", choices=("merge", "onnx"), default="merge",
                        help="merge: LoRA adapter -> merged checkpoint (default); onnx: checkpoint -> ONNX export")
    parser.add_argument("--output", "-o", required=True, help="directory of the merged checkpoint")
    parser.add_argument("--base", default=None, help="base checkpoint (default: the adapter manifest's parent)")
    parser.add_argument("--atol", type=float, default=1e-4, help="max |logit difference| accepted (default 1e-4)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    from lifecycle.onnx_export.cli import add_arguments

    add_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: Any) -> int:
    if args.format == "onnx":
        from lifecycle.onnx_export.cli import run

        return run(args)
    if not args.atol > 0:
        raise ConfigError(f"--atol must be positive, got {args.atol}")
    path, diff = export_merged(args.adapter, args.output, base=args.base, atol=args.atol, overwrite=args.overwrite)
    print(f"merged checkpoint: {path} (max |logit diff| vs base+adapter: {diff:.2e})")
    return 0
