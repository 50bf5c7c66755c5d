"""A training run on disk: ``last/`` to resume from, ``best/`` the best weights on validation.

``out_dir/last``: model.safetensors (a file :func:`kronfact.load` reopens), optimizer.safetensors and
state.json (step, history, schedule, optimizer scalars): nothing pickled, written to a temp folder and
swapped in. ``out_dir/best``: a transformers folder (:func:`kronfact.save_pretrained`) for transformers
models, else model.safetensors. Under FSDP the full state is gathered (collectively) and rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import io, pretrained
from .atomic import staged_dir
from .distributed import Dist, barrier, unwrap
from .errors import KronfactError

CHECKPOINT_FORMAT = 1
# Fields that fix the sequence of updates: a checkpoint resumes only under the same values.
SCHEDULE_FIELDS = ("tokens", "seq_len", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup", "weight_decay",
                    "betas", "eps", "grad_clip", "distill", "alpha", "temperature", "objective", "hidden_mse",
                    "hidden_cosine", "seed", "fsdp")


def state_options(d: Dist, **kw: Any) -> Any:
    return StateDictOptions(full_state_dict=True, cpu_offload=d.world > 1, **kw)


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state dict → (tensors for safetensors, JSON-able rest)."""
    tensors, scalars, keys = {}, {}, []
    for i, (pid, entry) in enumerate(osd["state"].items()):
        keys.append(pid)
        for k, v in entry.items():
            if isinstance(v, Tensor):
                tensors[f"{i}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}/{k}"] = v
    return tensors, {"keys": keys, "scalars": scalars, "param_groups": osd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[Any, dict[str, Any]] = {pid: {} for pid in meta["keys"]}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        i, k = flat.split("/", 1)
        state[meta["keys"][int(i)]][k] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _model_state(model: nn.Module, d: Dist) -> dict[str, Tensor]:
    """The full model state (gathered on rank 0 under FSDP; other ranks get {})."""
    return get_model_state_dict(model, options=state_options(d))


def save_weights(state: dict[str, Tensor], path: Path, model: nn.Module) -> None:
    """The (gathered) model state to one safetensors file that :func:`kronfact.load` reopens: tied
    tensors once, with the compressed-module metadata of ``model``."""
    inner = unwrap(model)
    io.write_state({k: t.detach().cpu() for k, t in state.items()}, io.compressed_modules(inner), path,
                   list(getattr(inner, "all_tied_weights_keys", None) or {}))


def load_weights(model: nn.Module, path: Path, d: Dist) -> None:
    """Load a file written by :func:`save_weights` (or kronfact.save): tied names are filled from
    their partner; any other missing, unexpected or misshapen tensor is a ValueError."""
    state = load_file(str(path))
    expected = unwrap(model).state_dict(keep_vars=True)
    tied: dict[int, list[str]] = {}
    for name, t in expected.items():
        tied.setdefault(id(t), []).append(name)
    for names in tied.values():
        present = [n for n in names if n in state]
        for n in names if present else []:
            state.setdefault(n, state[present[0]])
    bad = sorted(expected.keys() - state.keys())[:3] + sorted(state.keys() - expected.keys())[:3]
    bad += [n for n, t in expected.items() if n in state and tuple(state[n].shape) != tuple(t.shape)][:3]
    if bad:
        raise KronfactError(f"{path} does not fit this model (e.g. {', '.join(bad)}): resume with the same compressed "
                            "architecture, or use another out_dir")
    set_model_state_dict(model, state, options=state_options(d))


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                     d: Dist) -> None:
    """out_dir/last: model.safetensors, optimizer.safetensors, state.json. Collective under FSDP; rank 0 writes."""
    state = _model_state(model, d)
    osd = get_optimizer_state_dict(model, optimizer, options=state_options(d))
    if d.main:
        tensors, opt_meta = _flatten_optimizer(osd)
        with staged_dir(path) as tmp:
            save_weights(state, tmp / "model.safetensors", model)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps(dict(meta, format=CHECKPOINT_FORMAT, optimizer=opt_meta),
                                                       indent=1) + "\n")
    barrier(d)


def read_state(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise KronfactError(f"{path}/state.json is unreadable ({err}); delete {path} to start over") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise KronfactError(f"{path} is not a kronfact training checkpoint of format {CHECKPOINT_FORMAT}; delete it "
                            "to start over")
    return meta


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> None:
    load_weights(model, path / "model.safetensors", d)
    osd = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), read_state(path)["optimizer"])
    set_optimizer_state_dict(model, optimizer, osd, options=state_options(d))


def save_best(path: Path, model: nn.Module, d: Dist, fsdp: bool) -> None:
    """out_dir/best: a transformers folder (kronfact.save_pretrained) for HF models, else model.safetensors."""
    inner = unwrap(model)
    if not fsdp and callable(getattr(getattr(inner, "config", None), "save_pretrained", None)):
        if d.main:
            pretrained.save_pretrained(inner, path, overwrite=True)
    else:
        state = _model_state(model, d)
        if d.main:
            with staged_dir(path) as tmp:
                save_weights(state, tmp / io.WEIGHTS_NAME, model)
    barrier(d)


def check_compatible(saved: dict[str, Any], now: dict[str, Any], world: int, path: Path) -> None:
    """Refuse to resume ``saved`` (a state.json) under other schedule settings ``now`` or another world size."""
    now = dict(now)
    now["betas"] = list(now["betas"])
    diff = [f"{k}: checkpoint {saved['config'].get(k)!r}, now {v!r}" for k, v in now.items()
            if saved["config"].get(k) != v]
    if saved["world_size"] != world:
        diff.append(f"world size: checkpoint {saved['world_size']}, now {world}")
    if diff:
        raise KronfactError(f"cannot resume from {path}: the run differs ({'; '.join(diff)}); use the same settings "
                            "or another out_dir (or resume=False to start over there)")
