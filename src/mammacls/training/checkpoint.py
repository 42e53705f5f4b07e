"""Checkpoints: everything a run needs to continue (weights, optimiser, schedule, RNG, history), in
one safetensors file written atomically after every epoch; never unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mammacls.errors import MammaclsError
from mammacls.inference.model_files import CHECKPOINT_FILE
from mammacls.store import atomic_path, models_dir, writing


def find_resumable(name: str | None) -> Path:
    root = models_dir()
    if name:
        folder = root / name
        if not (folder / CHECKPOINT_FILE).is_file():
            raise MammaclsError(f"nothing to resume for {name!r}: no checkpoint in {folder}")
        return folder
    candidates = sorted(
        (p for p in root.glob(f"*/{CHECKPOINT_FILE}")), key=lambda p: p.stat().st_mtime, reverse=True
    ) if root.is_dir() else []
    if not candidates:
        raise MammaclsError("nothing to resume: no interrupted training run in the cache")
    return candidates[0].parent


def write_checkpoint(path: Path, net, optimizer, scheduler, info: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    from mammacls.nets.weights import state_dict_cpu

    tensors = {f"model/{k}": v for k, v in state_dict_cpu(net).items()}
    opt_state = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    tensors["rng/torch"] = torch.get_rng_state()
    header = {
        "info": json.dumps(info),
        "optim_param_groups": json.dumps(opt_state["param_groups"]),
        "optim_scalars": json.dumps(scalars),
        "scheduler": json.dumps(scheduler.state_dict()),
    }
    with atomic_path(path) as tmp, writing(path):
        save_file(tensors, str(tmp), metadata=header)


def read_checkpoint(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        info = json.loads(header["info"])
        groups = json.loads(header["optim_param_groups"])
        scalars = json.loads(header["optim_scalars"])
        scheduler = json.loads(header["scheduler"])
    except Exception as exc:  # damaged file: safetensors, JSON or missing keys
        raise MammaclsError(f"cannot resume: checkpoint {path} is damaged ({str(exc)[:100]})") from None
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in scalars.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    return {
        **info,
        "model": {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")},
        "optimizer": {"state": state, "param_groups": groups},
        "scheduler": scheduler,
        "rng": tensors["rng/torch"],
    }
