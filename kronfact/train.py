"""Recovery training for compressed models: one :func:`train` call, one :class:`TrainConfig`.

Objectives
- ``"lm"`` (causal LMs): next-token cross-entropy; with ``distill`` and a teacher (the uncompressed
  model) ``(1 − α)·CE + α·T²·KL(teacher_T ‖ student_T)`` over every position (:func:`distillation_loss`).
- ``"hidden"`` (encoders such as BERT / MiniLM): match the teacher's last hidden states on plain text,
  ``w_mse·MSE(h_s, h_t) + w_cos·(1 − cos(pool_s, pool_t))`` with mean-pooled sentence embeddings
  (:func:`hidden_distillation_loss`); needs the teacher.

Optimisation: AdamW with weight decay on the new Kronecker factors only (KronLinear ``a`` and ``b``,
as Krony-PT did; every other tensor has decay 0), linear warmup then cosine decay to
``min_lr_ratio·lr``, gradient clipping, gradient accumulation, bf16 autocast on CUDA only.

Data: a 1-D token stream (:func:`load_tokens`: local text files, or ``datasets`` when reachable);
each micro-batch is ``batch_size`` random contiguous windows drawn by a generator seeded from
(seed, rank, step, micro-step), and dropout is seeded the same way. The data position and the RNG
state are therefore a function of the step: a checkpoint (model and optimizer tensors in
safetensors, everything else in JSON — nothing pickled) resumes to the same loss curve, bit for bit
on CPU.

Validation every ``eval_every`` steps on held-out tokens the caller passes (never the test set);
the best-on-validation weights are kept (``out_dir/best``) and loaded back at the end.

Distributed: under ``torchrun --nproc_per_node N`` (WORLD_SIZE > 1 in the environment) the same call
initialises the process group from the environment (nccl on CUDA, gloo on CPU), wraps the model in
DistributedDataParallel (or FSDP with ``fsdp=True``), gives each rank its own data seed, and lets
only rank 0 write checkpoints and logs. ``tokens`` counts the tokens of all ranks together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .atomic import staged_dir
from .evaluate import _logits
from .layer import KronLinear

Objective = Literal["auto", "lm", "hidden"]
CHECKPOINT_FORMAT = 1
# Fields that fix the sequence of updates: a checkpoint resumes only under the same values.
_SCHEDULE_FIELDS = ("tokens", "seq_len", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup", "weight_decay",
                    "betas", "eps", "grad_clip", "distill", "alpha", "temperature", "objective", "hidden_mse",
                    "hidden_cosine", "seed", "fsdp")


_INT_FIELDS = ("tokens", "seq_len", "batch_size", "grad_accum", "eval_every", "eval_tokens", "save_every", "seed")
_FLOAT_FIELDS = ("lr", "min_lr_ratio", "warmup", "weight_decay", "eps", "grad_clip", "alpha", "temperature",
                 "hidden_mse", "hidden_cosine")


def _whole(name: str, value: Any) -> Any:
    """An int field: ints as they are, integral floats (1e6, as TOML and JSON write them) as ints;
    anything else (1e6 + 0.5, "8", True) is a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"TrainConfig: {name} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"TrainConfig: {name} must be a whole number, got {value!r}")
        return int(value)
    return value


@dataclass
class TrainConfig:
    """Recovery-training settings. ``tokens`` counts training tokens over all ranks and micro-batches.

    Integer fields (``tokens``, ``seq_len``, ``batch_size``, ``grad_accum``, ``eval_every``,
    ``eval_tokens``, ``save_every``, ``seed``) accept whole-number floats such as ``1e6`` and store them
    as ints; a fractional value is a ValueError.

    ``warmup`` is read by its value, not its type (TOML and JSON blur 1000 and 1000.0):
    ``0 ≤ warmup < 1`` is a fraction of the optimizer steps (0.02: the first 2%, rounded to whole
    steps); ``warmup ≥ 1`` is a number of steps and must be whole (1000 or 1e3 → 1000 steps;
    1.0 → one step; 2.5 is a ValueError). A warmup longer than the run is cut to the run.
    """

    tokens: int = 1_000_000
    seq_len: int | None = None          # window length; default: the model's context
    batch_size: int = 8                 # windows per micro-batch, per rank
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1           # cosine decays to lr·min_lr_ratio
    warmup: float = 0.02                # [0, 1): fraction of the steps; ≥ 1: a whole number of steps
    weight_decay: float = 0.1           # on the Kronecker factors only
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0              # max global gradient norm; 0 disables
    objective: Objective = "auto"       # auto: "lm" for *ForCausalLM / *LMHeadModel, else "hidden"
    distill: bool = False               # lm: mix in KL to the teacher (hidden always distils)
    alpha: float = 0.5                  # weight of the KL term
    temperature: float = 2.0
    hidden_mse: float = 1.0             # hidden objective: weight of the token-level MSE
    hidden_cosine: float = 1.0          # hidden objective: weight of 1 − cos of mean-pooled embeddings
    eval_every: int = 0                 # steps between validations; 0: only at the start and the end
    eval_tokens: int | None = None      # validate on at most this many held-out tokens
    keep_best: bool = True              # load the best-on-validation weights back at the end
    out_dir: str | None = None          # checkpoints and log.jsonl; None: nothing written
    save_every: int = 0                 # steps between resumable checkpoints; 0: only at the end
    resume: bool = True                 # continue from out_dir/last when it exists
    seed: int = 0
    bf16: bool = True                   # bf16 autocast, on CUDA only
    fsdp: bool = False                  # FullyShardedDataParallel instead of DDP when distributed
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # TOML/JSON give lists
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None or name not in ("seq_len", "eval_tokens"):
                setattr(self, name, _whole(name, value))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"TrainConfig: {name} must be a number, got {value!r}")
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.betas):
            raise ValueError(f"TrainConfig: betas must be two numbers, got {self.betas!r}")
        if self.warmup >= 1:
            if not float(self.warmup).is_integer():
                raise ValueError(f"TrainConfig: warmup={self.warmup!r} is ambiguous: a value < 1 is a fraction of "
                                 "the steps, a value ≥ 1 a whole number of steps (e.g. warmup=0.05 or warmup=500)")
            self.warmup = int(self.warmup)
        checks = [
            ("tokens", self.tokens >= 1), ("batch_size", self.batch_size >= 1), ("grad_accum", self.grad_accum >= 1),
            ("seq_len", self.seq_len is None or self.seq_len >= 2), ("lr", self.lr > 0),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1), ("warmup", self.warmup >= 0),
            ("weight_decay", self.weight_decay >= 0), ("eps", self.eps > 0), ("grad_clip", self.grad_clip >= 0),
            ("alpha", 0 <= self.alpha <= 1), ("temperature", self.temperature > 0),
            ("hidden_mse", self.hidden_mse >= 0), ("hidden_cosine", self.hidden_cosine >= 0),
            ("eval_every", self.eval_every >= 0), ("save_every", self.save_every >= 0),
            ("eval_tokens", self.eval_tokens is None or self.eval_tokens >= 2),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)),
            ("objective", self.objective in ("auto", "lm", "hidden")),
        ]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ValueError(f"TrainConfig: invalid {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")


@dataclass
class TrainResult:
    """What :func:`train` did. ``history``: one dict per optimizer step (step, tokens, loss, lr,
    grad_norm, and val / val_ppl / val_cosine where validated; step 0 = before training)."""

    steps: int
    tokens: int
    history: list[dict[str, float]]
    best_step: int | None
    best_val: float | None
    final_val: float | None
    wall_time: float
    resumed_from: int | None = None
    out_dir: str | None = None

    def curve(self, key: str = "loss") -> list[tuple[int, float]]:
        """(step, value) for every history entry that has ``key``."""
        return [(int(h["step"]), h[key]) for h in self.history if key in h]


# ----------------------------------------------------------------------------------------------- losses


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor,
                      alpha: float = 0.5, temperature: float = 2.0) -> Tensor:
    """``(1 − α)·CE(student, targets) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``.

    Logits (..., vocab), targets (...) of token ids; both terms are means over positions, in float32.
    With ``teacher_logits`` None (or α = 0) it is the plain cross-entropy.
    """
    s = student_logits.flatten(0, -2).float()
    ce = F.cross_entropy(s, targets.flatten())
    if teacher_logits is None or alpha == 0:
        return ce
    t = teacher_logits.flatten(0, -2).float()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean")
    return (1 - alpha) * ce + alpha * temperature**2 * kl


def mean_pool(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """(batch, seq, dim) → (batch, dim): the mean over the positions where ``mask`` (batch, seq) is 1."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def hidden_distillation_loss(student_hidden: Tensor, teacher_hidden: Tensor, mse: float = 1.0,
                             cosine: float = 1.0) -> Tensor:
    """``mse·mean((h_s − h_t)²) + cosine·mean(1 − cos(pool(h_s), pool(h_t)))`` for (batch, seq, dim) states."""
    s, t = student_hidden.float(), teacher_hidden.float()
    loss = s.new_zeros(())
    if mse:
        loss = loss + mse * F.mse_loss(s, t)
    if cosine:
        loss = loss + cosine * (1 - F.cosine_similarity(mean_pool(s), mean_pool(t), dim=-1)).mean()
    return loss


# ------------------------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: the KronLinear factors (``a``, ``b``) with ``weight_decay``, every other
    trainable parameter with 0. Tied parameters appear once; empty groups are left out."""
    factors = {id(p) for m in model.modules() if isinstance(m, KronLinear) for p in (m.a, m.b)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in factors], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in factors], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to lr·min_lr_ratio."""
    # warmup < 1: a fraction of the steps; ≥ 1: whole steps (TrainConfig validates and documents this)
    warmup = round(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    warmup = min(warmup, total_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    low = config.lr * config.min_lr_ratio
    return low + 0.5 * (config.lr - low) * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------- data


TRAIN_DATASETS: dict[str, list[tuple[str, str | None]]] = {
    "openwebtext": [("Skylion007/openwebtext", None), ("openwebtext", None)],
    "wikitext-103": [("wikitext", "wikitext-103-v1")],
    "wikitext-2": [("wikitext", "wikitext-2-v1")],
}


def load_tokens(source: str | os.PathLike, tokenizer: Any, *, split: str = "train",
                max_tokens: int | None = None) -> Tensor:
    """A 1-D LongTensor token stream from a UTF-8 text file, a folder of ``*.txt`` files (sorted,
    concatenated), or a dataset name in :data:`TRAIN_DATASETS` (``split`` of it, streamed through
    ``datasets``; documents joined by the tokenizer's end-of-text token when it has one).
    At most ``max_tokens`` tokens (needed for the huge openwebtext)."""
    from .evaluate import encode, hub_texts, tokenize_file

    name = str(source)
    if name in TRAIN_DATASETS:
        eos = _eos_id(tokenizer)
        ids: list[int] = []
        for text in hub_texts(TRAIN_DATASETS[name], split, streaming=True, what=f"{name} ({split})"):
            ids += encode(tokenizer, text) + ([] if eos is None else [eos])
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        stream = torch.tensor(ids, dtype=torch.long)
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise ValueError(f"{path} holds no *.txt files to train on")
            stream = torch.cat([tokenize_file(f, tokenizer) for f in files])
        elif path.is_file():
            stream = tokenize_file(path, tokenizer)
        else:
            raise ValueError(f"training data {name!r} is neither a text file, a folder of *.txt files, nor one of "
                             f"the datasets {sorted(TRAIN_DATASETS)}")
    return stream if max_tokens is None else stream[:max_tokens]


def _eos_id(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and hasattr(tokenizer, "token_to_id"):
        eos = tokenizer.token_to_id("<|endoftext|>")
    return eos


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (hashed: nearby inputs give unrelated streams)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_windows(ids: Tensor, batch_size: int, length: int, seed: int) -> Tensor:
    """(batch_size, length) random contiguous windows of the 1-D stream ``ids``, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (batch_size,), generator=g)
    return ids[starts[:, None] + torch.arange(length)]


def calibration_batches(ids: Tensor, windows: int = 32, length: int = 256, *, seed: int = 0,
                        batch_size: int = 8) -> list[Tensor]:
    """``windows`` random windows of ``length`` tokens of the stream ``ids`` (seed), in batches of
    ``batch_size``: the ``calibration=`` argument of :func:`kronfact.compress`. A stream shorter than
    one window gives windows of its whole length.

    >>> [tuple(b.shape) for b in calibration_batches(torch.arange(1000), windows=10, length=64)]
    [(8, 64), (2, 64)]
    """
    if windows < 1 or length < 2:
        raise ValueError(f"calibration needs windows ≥ 1 and length ≥ 2, got windows={windows}, length={length}")
    length = min(length, ids.numel() - 1)
    if length < 2:
        raise ValueError(f"calibration text holds too few tokens ({ids.numel()}); give at least a few hundred")
    return list(sample_windows(ids, windows, length, seed).split(batch_size))


# ------------------------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); world 1 otherwise."""
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, created=True)


def _all_mean(value: Tensor, d: _Dist) -> float:
    if d.world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= d.world
    return float(value)


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------ checkpoints


def _state_options(d: _Dist, **kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

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


def _write_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder via a temp folder beside ``target``, then swap it in (never half-written)."""
    with staged_dir(target) as tmp:
        write(tmp)


def _model_state(model: nn.Module, d: _Dist) -> dict[str, Tensor]:
    """The full model state (gathered on rank 0 under FSDP; other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(d))


def _save_weights(state: dict[str, Tensor], path: Path) -> None:
    """Model tensors to one safetensors file, tensors sharing storage (tied weights) once."""
    seen, kept = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            kept[name] = t.detach().cpu().contiguous()
    save_file(kept, str(path))


def _load_weights(model: nn.Module, path: Path, d: _Dist) -> None:
    """Load a file written by :func:`_save_weights` (or kronfact.save): tied names are filled from
    their partner; any other missing, unexpected or misshapen tensor is a ValueError."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = load_file(str(path))
    expected = _unwrap(model).state_dict(keep_vars=True)
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
        raise ValueError(f"{path} does not fit this model (e.g. {', '.join(bad)}): resume with the same compressed "
                         "architecture, or use another out_dir")
    set_model_state_dict(model, state, options=_state_options(d))


def _save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                     d: _Dist) -> None:
    """out_dir/last: model.safetensors, optimizer.safetensors, state.json. Collective under FSDP; rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = _model_state(model, d)
    osd = get_optimizer_state_dict(model, optimizer, options=_state_options(d))
    if d.main:
        tensors, opt_meta = _flatten_optimizer(osd)

        def write(tmp: Path) -> None:
            _save_weights(state, tmp / "model.safetensors")
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps(dict(meta, format=CHECKPOINT_FORMAT, optimizer=opt_meta),
                                                       indent=1) + "\n")

        _write_dir(path, write)
    _barrier(d)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}/state.json is unreadable ({err}); delete {path} to start over") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a kronfact training checkpoint of format {CHECKPOINT_FORMAT}; delete it "
                         "to start over")
    return meta


def _load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, d: _Dist) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    _load_weights(model, path / "model.safetensors", d)
    osd = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), _read_state(path)["optimizer"])
    set_optimizer_state_dict(model, optimizer, osd, options=_state_options(d))


def _save_best(path: Path, model: nn.Module, d: _Dist, fsdp: bool) -> None:
    """out_dir/best: a transformers folder (kronfact.save_pretrained) for HF models, else model.safetensors."""
    from . import io

    inner = _unwrap(model)
    if not fsdp and callable(getattr(getattr(inner, "config", None), "save_pretrained", None)):
        if d.main:
            io.save_pretrained(inner, path, overwrite=True)
    else:
        state = _model_state(model, d)
        if d.main:
            _write_dir(path, lambda tmp: _save_weights(state, tmp / io.WEIGHTS_NAME))
    _barrier(d)


# ---------------------------------------------------------------------------------------------- training


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def resolve_objective(model: nn.Module, objective: str) -> str:
    """"lm" for causal LMs (class name ending in ForCausalLM / LMHeadModel), "hidden" otherwise."""
    if objective != "auto":
        return objective
    name = type(_unwrap(model)).__name__
    return "lm" if name.endswith(("ForCausalLM", "LMHeadModel")) else "hidden"


def _context(model: nn.Module) -> int:
    from .evaluate import model_context

    return model_context(_unwrap(model))


def _check_seq_len(model: nn.Module, seq_len: int) -> None:
    """A ValueError when ``seq_len`` exceeds the positions the model has (skipped when its config does
    not tell): a longer window would fail deep inside the position embedding."""
    try:
        limit = _context(model)
    except ValueError:
        return
    if seq_len > limit:
        raise ValueError(f"TrainConfig.seq_len={seq_len} is longer than the model's context of {limit} positions: "
                         f"set seq_len to at most {limit} (or leave it None to use the model's context)")


def _hidden(model: nn.Module, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Last hidden states (batch, seq, dim) of a transformers model (base model or one with a head)."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    if getattr(out, "hidden_states", None) is not None:
        return out.hidden_states[-1]
    raise ValueError(f"{type(_unwrap(model)).__name__} returns no hidden states; the hidden objective needs a "
                     "transformers model")


@torch.no_grad()
def embedding_cosine(model: nn.Module, reference: nn.Module, tokenizer: Any, texts: list[str],
                     batch_size: int = 32, max_length: int = 128) -> float:
    """Mean cosine similarity of ``model``'s and ``reference``'s sentence embeddings (mean-pooled last
    hidden states, padding masked out) over ``texts``, each tokenized with its special tokens."""
    if not texts:
        raise ValueError("embedding_cosine needs at least one text, got an empty list")
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
            rows = [[i for i, m in zip(e.ids, e.attention_mask, strict=True) if m][:max_length]
                    for e in tokenizer.encode_batch(chunk)]
        else:
            rows = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in chunk]
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, row in enumerate(rows):
            ids[j, :len(row)], mask[j, :len(row)] = torch.tensor(row), 1
        ids, mask = ids.to(device), mask.to(device)
        a = mean_pool(_hidden(model, ids, mask).float(), mask)
        b = mean_pool(_hidden(reference, ids, mask).float(), mask)
        total += float(F.cosine_similarity(a, b, dim=-1).sum())
    return total / len(texts)


class _Objective:
    """One micro-batch's loss, and the validation metrics, for an objective."""

    def __init__(self, kind: str, config: TrainConfig, teacher: nn.Module | None):
        self.kind, self.config, self.teacher = kind, config, teacher

    def window(self, seq_len: int) -> int:
        return seq_len + 1 if self.kind == "lm" else seq_len

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        c = self.config
        if self.kind == "lm":
            x, y = batch[:, :-1], batch[:, 1:]
            logits = _logits(model, x)
            teacher = None
            if c.distill:
                with torch.no_grad():
                    teacher = _logits(self.teacher, x)
            return distillation_loss(logits, teacher, y, c.alpha if c.distill else 0.0, c.temperature)
        with torch.no_grad():
            target = _hidden(self.teacher, batch)
        return hidden_distillation_loss(_hidden(model, batch), target, c.hidden_mse, c.hidden_cosine)

    @torch.no_grad()
    def validate(self, model: nn.Module, ids: Tensor, seq_len: int, device: torch.device) -> dict[str, float]:
        """lm: val = mean NLL over non-overlapping windows (token-weighted), val_ppl = exp(val).
        hidden: val = the distillation loss, val_cosine = mean cos of mean-pooled embeddings to the teacher."""
        from .evaluate import perplexity

        was_training = model.training
        model.eval()
        try:
            if self.kind == "lm":
                ppl = perplexity(model, ids, context=seq_len, stride=seq_len, batch_size=self.config.batch_size)
                return {"val": math.log(ppl), "val_ppl": ppl}
            n = ids.numel() // seq_len
            if n == 0:
                raise ValueError(f"validation needs at least seq_len={seq_len} tokens, got {ids.numel()}")
            windows = ids[:n * seq_len].view(n, seq_len)
            loss_sum, cos_sum = 0.0, 0.0
            for chunk in windows.split(self.config.batch_size):
                chunk = chunk.to(device)
                s, t = _hidden(model, chunk), _hidden(self.teacher, chunk)
                c = self.config
                loss_sum += float(hidden_distillation_loss(s, t, c.hidden_mse, c.hidden_cosine)) * len(chunk)
                cos_sum += float(F.cosine_similarity(mean_pool(s.float()), mean_pool(t.float()), dim=-1).sum())
            return {"val": loss_sum / n, "val_cosine": cos_sum / n}
        finally:
            model.train(was_training)


def _fully_shard() -> Callable[..., nn.Module]:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _wrap(model: nn.Module, config: TrainConfig, d: _Dist, device: torch.device, kind: str) -> nn.Module:
    """DistributedDataParallel, or FSDP2 (``fully_shard``: one unit per block named in transformers'
    ``_no_split_modules``, then the root; works on CPU with gloo too); the model itself on one process."""
    if d.world == 1:
        return model
    if config.fsdp:
        with torch.no_grad():  # start every rank from rank 0's weights, as DDP does
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t, 0)
        shard = _fully_shard()
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in list(model.modules())[1:]:
            if type(module).__name__ in blocks:
                shard(module)
        return shard(model)
    from torch.nn.parallel import DistributedDataParallel

    # the hidden objective leaves heads such as BERT's pooler without gradients
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=kind == "hidden")


def _no_sync(model: nn.Module, skip: bool) -> Any:
    """Skip the gradient all-reduce of a non-final micro-batch (DDP's no_sync, FSDP2's flag)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(not skip)
        return nullcontext()
    return model.no_sync() if skip else nullcontext()


def _progress(enabled: bool, total: int, start: int) -> Any:
    """A rich progress bar (or a no-op stand-in) with loss / lr / throughput fields."""
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn())
    prog.add_task("train", total=total, completed=start, info="")
    return prog


def _compatible(saved: dict[str, Any], config: TrainConfig, world: int, path: Path) -> None:
    now = {k: getattr(config, k) for k in _SCHEDULE_FIELDS}
    now["betas"] = list(now["betas"])
    diff = [f"{k}: checkpoint {saved['config'].get(k)!r}, now {v!r}" for k, v in now.items()
            if saved["config"].get(k) != v]
    if saved["world_size"] != world:
        diff.append(f"world size: checkpoint {saved['world_size']}, now {world}")
    if diff:
        raise ValueError(f"cannot resume from {path}: the run differs ({'; '.join(diff)}); use the same settings "
                         "or another out_dir (or resume=False to start over there)")


def train(
    model: nn.Module,
    data: Tensor,
    config: TrainConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    val_data: Tensor | None = None,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on the 1-D token stream ``data`` (N,) and return what happened.

    ``teacher``: the uncompressed model, needed for distillation (``config.distill`` on a causal LM,
    always for the "hidden" objective); moved to the model's device, in eval mode and frozen while
    training (its ``requires_grad`` flags are restored afterwards). ``val_data`` (M,):
    held-out tokens for validation and best-checkpoint selection (pass validation, never test,
    data). ``callback(entry)`` runs after every optimizer step (after its checkpoint) with that
    step's history entry. The model's device and dtype are kept; under torchrun see the module doc.
    """
    config = TrainConfig() if config is None else config
    device = next(model.parameters()).device
    kind = resolve_objective(model, config.objective)
    if kind not in ("lm", "hidden"):
        raise ValueError(f"objective must be 'auto', 'lm' or 'hidden', got {kind!r}")
    if teacher is None and (kind == "hidden" or config.distill):
        raise ValueError(f"the {'hidden-state distillation' if kind == 'hidden' else 'distillation'} objective "
                         "needs teacher=<the uncompressed model>")
    if not isinstance(data, Tensor) or data.dim() != 1 or data.is_floating_point():
        raise ValueError("data must be a 1-D integer tensor of token ids (see kronfact.train.load_tokens)")
    seq_len = config.seq_len or _context(model)
    if config.seq_len is not None:
        _check_seq_len(model, config.seq_len)
    objective = _Objective(kind, config, teacher)
    if data.numel() < objective.window(seq_len):
        raise ValueError(f"data holds {data.numel()} tokens, fewer than one window of {objective.window(seq_len)}")
    if val_data is not None and config.eval_tokens is not None:
        val_data = val_data[:config.eval_tokens]
    frozen = [] if teacher is None else [p for p in teacher.parameters() if p.requires_grad]
    if teacher is not None:  # frozen while it teaches; the caller's flags come back afterwards
        teacher.to(device).eval().requires_grad_(False)

    d = _init_distributed(device)
    try:
        return _train(model, data, config, objective, seq_len, val_data, callback, d, device)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if d.created:
            dist.destroy_process_group()


def _train(model: nn.Module, data: Tensor, config: TrainConfig, objective: _Objective, seq_len: int,
           val_data: Tensor | None, callback: Callable[[dict[str, float]], None] | None, d: _Dist,
           device: torch.device) -> TrainResult:
    if d.world > 1 and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        model.to(device)
        if objective.teacher is not None:
            objective.teacher.to(device)
    tokens_per_step = config.batch_size * config.grad_accum * d.world * seq_len
    total = max(1, config.tokens // tokens_per_step)
    out = Path(config.out_dir) if config.out_dir else None
    sharded = config.fsdp and d.world > 1
    if config.keep_best and sharded and out is None and val_data is not None:
        raise ValueError("keep_best under FSDP reloads the best weights from disk: set out_dir")

    model.train()
    wrapped = _wrap(model, config, d, device, objective.kind)
    optimizer = torch.optim.AdamW(param_groups(wrapped, config.weight_decay), lr=config.lr, betas=config.betas,
                                  eps=config.eps)
    history: list[dict[str, float]] = []
    best: list | None = None  # [step, val]
    best_state: dict[str, Tensor] | None = None  # in memory when there is no out_dir
    start = resumed_from = 0
    if out is not None and config.resume and (out / "last" / "state.json").exists():
        saved = _read_state(out / "last")
        _compatible(saved, config, d.world, out / "last")
        _load_checkpoint(out / "last", wrapped, optimizer, d)
        start = resumed_from = saved["step"]
        history, best = saved["history"], saved["best"]

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.bf16
                else nullcontext())
    stack = ExitStack()
    if out is not None and d.main:
        out.mkdir(parents=True, exist_ok=True)
    log = stack.enter_context((out / "log.jsonl").open("a")) if out is not None and d.main else None
    t0 = time.perf_counter()

    def validate(step: int, entry: dict[str, float]) -> None:
        nonlocal best, best_state
        if val_data is None:
            return
        with autocast:
            entry.update(objective.validate(wrapped if sharded else _unwrap(wrapped), val_data, seq_len, device))
        if best is None or entry["val"] < best[1]:
            best = [step, entry["val"]]
            if out is not None:
                _save_best(out / "best", wrapped, d, sharded)
            elif config.keep_best:
                best_state = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}

    def record(entry: dict[str, float]) -> None:
        history.append(entry)
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    def meta(step: int) -> dict[str, Any]:
        cfg = dict(asdict(config), betas=list(config.betas))
        return {"step": step, "tokens": step * tokens_per_step, "history": history, "best": best,
                "world_size": d.world, "seq_len": seq_len, "config": cfg}

    rng_devices = [device] if device.type == "cuda" else []
    with stack, torch.random.fork_rng(devices=rng_devices), _progress(config.progress and d.main, total, start) as bar:
        if start == 0:
            entry: dict[str, float] = {"step": 0, "tokens": 0}
            validate(0, entry)
            if "val" in entry:
                record(entry)
        for step in range(start, total):
            lr = lr_at(step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(config.grad_accum):
                torch.manual_seed(_seed(config.seed, d.rank, step, micro, 1))  # dropout
                batch = sample_windows(data, config.batch_size, objective.window(seq_len),
                                       _seed(config.seed, d.rank, step, micro)).to(device)
                with _no_sync(wrapped, d.world > 1 and micro < config.grad_accum - 1), autocast:
                    loss = objective.loss(wrapped, batch)
                (loss / config.grad_accum).backward()
                loss_sum += loss.detach().float()
            grad_norm = _clip(wrapped, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            entry = {"step": step + 1, "tokens": (step + 1) * tokens_per_step,
                     "loss": _all_mean(loss_sum / config.grad_accum, d), "lr": lr, "grad_norm": grad_norm}
            if step + 1 == total or (config.eval_every and (step + 1) % config.eval_every == 0):
                validate(step + 1, entry)
            record(entry)
            if out is not None and (step + 1 == total or (config.save_every and (step + 1) % config.save_every == 0)):
                _save_checkpoint(out / "last", wrapped, optimizer, meta(step + 1), d)
            if bar is not None:
                rate = (step + 1 - start) * tokens_per_step / (time.perf_counter() - t0)
                bar.update(bar.task_ids[0], completed=step + 1, info=f"loss {entry['loss']:.3f}  lr {lr:.2e}  "
                           f"{rate:,.0f} tok/s" + (f"  val {entry['val']:.3f}" if "val" in entry else ""))
            if callback is not None:
                callback(entry)

    if config.keep_best and best is not None and best[0] != total:
        if out is not None:
            _load_weights(wrapped, out / "best" / "model.safetensors", d)
        elif best_state is not None:
            _unwrap(model).load_state_dict(best_state)
    final_val = next((h["val"] for h in reversed(history) if h["step"] == total and "val" in h), None)
    return TrainResult(steps=total, tokens=total * tokens_per_step, history=history,
                       best_step=None if best is None else int(best[0]), best_val=None if best is None else best[1],
                       final_val=final_val, wall_time=time.perf_counter() - t0, resumed_from=resumed_from or None,
                       out_dir=None if out is None else str(out))


def _clip(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (FSDP's sharded gradients included) and return it before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


__all__ = ["TrainConfig", "TrainResult", "calibration_batches", "distillation_loss", "embedding_cosine",
           "hidden_distillation_loss", "load_tokens", "lr_at",
           "mean_pool", "param_groups", "resolve_objective", "sample_windows", "train"]
