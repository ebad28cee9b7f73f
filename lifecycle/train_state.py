"""Trainer state (optimizer, LR schedule, RNG, counters) saved without pickle.

Resuming must be exact, and loading must never unpickle: tensors go to `optimizer.safetensors`
(`state.<param index>.<name>` and `rng.<name>`), everything else to `trainer_state.json`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lifecycle.errors import CheckpointError

STATE_DIR = "trainer_state"


def save_train_state(directory: Path, *, optimizer: torch.optim.Optimizer, scheduler: Any,
                     counters: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    save_file(tensors, str(directory / "optimizer.safetensors"))
    meta = {
        "param_groups": opt["param_groups"],
        "state_scalars": scalars,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng_numpy_pos": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "rng_python": _python_rng_to_json(random.getstate()),
        "counters": counters,
    }
    (directory / "trainer_state.json").write_text(json.dumps(meta, indent=1))


def load_train_state(directory: Path, *, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer/scheduler/RNG in place; return the saved counters."""
    json_path, tensor_path = directory / "trainer_state.json", directory / "optimizer.safetensors"
    if not json_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(f"{directory}: trainer state missing (trainer_state.json / optimizer.safetensors); "
                              "this checkpoint cannot resume training")
    meta = json.loads(json_path.read_text())
    tensors = load_file(str(tensor_path))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["state_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
    for values in state.values():
        for name, value in values.items():
            if torch.is_tensor(value) and name != "step":
                values[name] = value.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    pos, has_gauss, cached = meta["rng_numpy_pos"]
    np.random.set_state(("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_python_rng_from_json(meta["rng_python"]))
    return meta["counters"]


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
