"""Checkpoint: the one handle that crosses from each stage to the next.

A checkpoint is a directory transformers loads as it is (config.json, model.safetensors, tokenizer
files, generation_config.json) plus `manifest.json`: the recipe that produced it with its full
config, the parent checkpoint, the dataset manifest hash, the package version and git revision, and
the sha256 of every other file in the directory.

- Saving is atomic: everything is written into a hidden temporary directory beside the target, the
  manifest last, then the directory is renamed into place. A crash mid-save leaves only the hidden
  temporary directory, never a half-written checkpoint under the real name.
- Loading verifies every hash; a missing, truncated or corrupted file is refused naming the file.
- A plain transformers directory (no manifest) of a Llama/Qwen2-style model is accepted as input;
  it is loaded from safetensors only (pickle-based `.bin` weights are refused).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lifecycle.data.manifest import sha256_file
from lifecycle.errors import CheckpointError, ConfigError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "lmforge-checkpoint"
FORMAT_VERSION = 1
# Architectures every stage handles: Llama-style decoders (ours) and their close relatives.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def git_revision() -> str | None:
    """`<sha>` or `<sha>-dirty` of the lmforge source tree, or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


@dataclass
class Checkpoint:
    """A verified checkpoint directory. `manifest` is None for a plain transformers directory."""

    path: Path
    config: dict[str, Any]
    manifest: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def is_lmforge(self) -> bool:
        return self.manifest is not None

    @property
    def recipe(self) -> str | None:
        return self.manifest.get("recipe") if self.manifest else None

    @property
    def quantization(self) -> dict[str, Any] | None:
        if self.manifest and self.manifest.get("quantization"):
            return self.manifest["quantization"]
        return self.config.get("quantization_config")

    def manifest_sha256(self) -> str | None:
        manifest_path = self.path / MANIFEST_NAME
        return sha256_file(manifest_path) if manifest_path.is_file() else None

    def reference(self) -> dict[str, Any]:
        """How a child checkpoint names this one as its parent."""
        return {"path": str(self.path.resolve()), "manifest_sha256": self.manifest_sha256(),
                "recipe": self.recipe}

    def load_model(self, *, device: Any = None, dtype: Any = None):
        """The transformers model, from safetensors only, never with remote code."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            self.path, trust_remote_code=False, use_safetensors=True,
            **({"dtype": dtype} if dtype is not None else {}))
        if device is not None:
            model = model.to(device)
        return model

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if not (self.path / "tokenizer.json").is_file() and not (self.path / "tokenizer_config.json").is_file():
            raise CheckpointError(f"{self.path}: checkpoint has no tokenizer files (tokenizer.json)")
        return AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)


def _hash_files(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME:
            continue
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def publish_directory(tmp: Path, out_dir: Path) -> None:
    """Make the finished directory `tmp` appear at `out_dir` by renames: synced first, and an existing `out_dir` is
    moved aside before the swap, so a crash at any point leaves the old or the new one whole. Its files get the
    mode a plain write would (umask), not the writers' temporary-file 0o600 (data/manifest.default_file_mode)."""
    from lifecycle.data.manifest import default_file_mode, umask

    file_mode, dir_mode = default_file_mode(), 0o777 & ~umask()
    for path in [tmp, *tmp.rglob("*")]:
        if not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else file_mode)
    _fsync_tree(tmp)
    if out_dir.exists():
        trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, trash)
        os.rename(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def save_checkpoint(
    out_dir: str | Path,
    model: Any,
    tokenizer: Any,
    *,
    recipe: str,
    recipe_config: dict[str, Any],
    parent: Checkpoint | None = None,
    dataset_manifest_hash: str | None = None,
    metrics: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    write_extra_files: Callable[[Path], None] | None = None,
    overwrite: bool = False,
) -> Checkpoint:
    """Write `model` + `tokenizer` + manifest to `out_dir` atomically and return the verified Checkpoint.

    `write_extra_files(tmp_dir)` may add files (e.g. trainer state) before hashing; they are covered
    by the manifest like the weights.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists; pass overwrite=True (or --overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_generation_config(tmp, model, tokenizer)
        if write_extra_files is not None:
            write_extra_files(tmp)
        from lifecycle import __version__

        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "lmforge_version": __version__,
            "git_revision": git_revision(),
            "recipe": recipe,
            "recipe_config": recipe_config,
            "parent": parent.reference() if parent is not None else None,
            "dataset_manifest_hash": dataset_manifest_hash,
            "model": {
                "architecture": type(model).__name__,
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            },
            "quantization": quantization,
            "metrics": metrics or {},
            "extra": extra or {},
            "files": _hash_files(tmp),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
        publish_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_checkpoint(out_dir)


def _write_generation_config(directory: Path, model: Any, tokenizer: Any) -> None:
    """Greedy by default, with our special tokens: tools that read generation_config.json agree with us."""
    from transformers import GenerationConfig

    eos_ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None and im_end not in eos_ids:
        eos_ids.append(im_end)
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        do_sample=False,
    )
    gen.save_pretrained(directory)


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Open and verify a checkpoint directory (ours or a plain transformers one).

    Raises CheckpointError naming the directory or file when it is not a usable checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; a checkpoint is a directory with config.json and "
                              "*.safetensors")
    config_path = path / "config.json"
    if not config_path.is_file():
        hint = ""
        if any(path.glob("*/" + MANIFEST_NAME)):
            hint = " (it holds checkpoints in subdirectories; pass one of those)"
        raise CheckpointError(f"{path}: not a checkpoint: config.json is missing{hint}")
    manifest = None
    warnings: list[str] = []
    manifest_path = path / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{manifest_path}: not valid JSON ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME or "files" not in manifest:
            raise CheckpointError(f"{manifest_path}: not an lmforge checkpoint manifest")
        if verify:
            verify_files(path, manifest["files"])
    else:
        warnings.append("no manifest.json: a plain transformers checkpoint, files not verified")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    _check_model_files(path, config)
    return Checkpoint(path=path, config=config, manifest=manifest, warnings=warnings)


def verify_files(root: Path, files: dict[str, dict[str, Any]]) -> None:
    """Every file listed in the manifest exists with its size and sha256."""
    for rel, meta in files.items():
        file_path = root / rel
        if not file_path.is_file():
            raise CheckpointError(f"{file_path}: listed in {MANIFEST_NAME} but missing")
        size = file_path.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{file_path}: size {size} bytes, manifest says {meta['size']} "
                                  "(truncated or replaced); re-copy or re-create the checkpoint")
        if sha256_file(file_path) != meta["sha256"]:
            raise CheckpointError(f"{file_path}: sha256 does not match {MANIFEST_NAME} (corrupted or modified); "
                                  "re-copy or re-create the checkpoint")


def _check_model_files(path: Path, config: dict[str, Any]) -> None:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{path / 'config.json'}: model_type {model_type!r} is not supported; "
                              f"lmforge handles {', '.join(SUPPORTED_MODEL_TYPES)} (Llama/Qwen2-style decoders)")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise CheckpointError(f"{path}: weights are pickle files (.bin/.pt), which lmforge never loads; "
                                  "convert them to safetensors first")
        raise CheckpointError(f"{path}: no *.safetensors weights")


def check_output_dir(output_dir: str | Path, checkpoint: str | Path | None, flag: str = "--output-dir") -> None:
    """Refuse, before anything is written, an output directory that is a file or is the checkpoint the command
    reads: its outputs would land among the checkpoint's own files (a run into another run's directory is refused
    by that run's settings check)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: exists and is not a directory")
    if checkpoint is not None and Path(checkpoint).exists() and out.resolve() == Path(checkpoint).resolve():
        raise ConfigError(f"{flag} {out}: is the checkpoint this command reads ({checkpoint}); its outputs would be "
                          "written among the checkpoint's files: choose another directory")


def latest_checkpoint(run_dir: str | Path, prefix: str = "step-") -> Path | None:
    """The newest complete `run_dir/checkpoints/step-*` directory (hidden temp dirs are never complete)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith(prefix) and (p / MANIFEST_NAME).is_file()]
    return max(done, key=lambda p: int(p.name[len(prefix):]), default=None)


# ----------------------------------------------------------------------------------------------- CLI


def add_command(sub: Any) -> None:
    from lifecycle.cli import add_subcommand

    group = add_subcommand(sub, "checkpoint", help="inspect and verify checkpoints",
                           example="lmforge checkpoint verify runs/small/final")
    actions = group.add_subparsers(title="actions", metavar="ACTION")
    verify = add_subcommand(actions, "verify", help="check every file against the manifest's sha256 (ONNX exports too)",
                            example="lmforge checkpoint verify runs/small/final")
    verify.add_argument("path", help="checkpoint directory")
    verify.set_defaults(func=_cmd_verify)
    info = add_subcommand(actions, "info", help="print the manifest: recipe, parent, data, size",
                          example="lmforge checkpoint info runs/small/final --json")
    info.add_argument("path", help="checkpoint directory")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.set_defaults(func=_cmd_info)


def _cmd_verify(args: Any) -> int:
    from lifecycle.onnx_export.verify import describe, is_onnx_export, verify_onnx_export

    if is_onnx_export(Path(args.path)):  # model.onnx + external data, no safetensors: its own checks
        print(describe(verify_onnx_export(args.path)))
        return 0
    ckpt = load_checkpoint(args.path)
    if ckpt.manifest is None:
        print(f"{ckpt.path}: plain transformers checkpoint (no manifest); config and weights format OK")
    else:
        print(f"{ckpt.path}: OK ({len(ckpt.manifest['files'])} files verified)")
    return 0


def _cmd_info(args: Any) -> int:
    from lifecycle.onnx_export.verify import describe, is_onnx_export, verify_onnx_export

    if is_onnx_export(Path(args.path)):  # no safetensors: the export's own loader and summary
        summary = verify_onnx_export(args.path)
        if args.json:
            print((Path(args.path) / MANIFEST_NAME).read_text(encoding="utf-8").rstrip())
        else:
            print(describe(summary))
        return 0
    ckpt = load_checkpoint(args.path)
    if args.json:
        print(json.dumps(ckpt.manifest or {"config": ckpt.config}, indent=2))
        return 0
    m = ckpt.manifest or {}
    model = m.get("model", {})
    rows = [
        ("path", str(ckpt.path)),
        ("architecture", model.get("architecture") or ",".join(ckpt.config.get("architectures", []))),
        ("parameters", f"{model['num_parameters'] / 1e6:.1f}M" if "num_parameters" in model else "?"),
        ("recipe", m.get("recipe", "(none: plain transformers checkpoint)")),
        ("parent", (m.get("parent") or {}).get("path", "-")),
        ("dataset manifest", m.get("dataset_manifest_hash") or "-"),
        ("quantization", json.dumps(ckpt.quantization) if ckpt.quantization else "none"),
        ("created", f"{m.get('created_at', '-')} by lmforge {m.get('lmforge_version', '-')} "
                    f"(git {m.get('git_revision') or '-'})"),
        ("metrics", json.dumps(m.get("metrics", {}))),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for warning in ckpt.warnings:
        print(f"warning: {warning}")
    return 0
