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

import importlib
import json
import math
import sys
import time
import types
import warnings
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import distributed, progress, resume
from .data import DATASETS, TRAIN_SETS, derived_seed, sample_windows
from .distributed import Dist, all_mean, init_distributed, no_sync, unwrap
from .errors import KronfactError
from .layer import KronLinear
from .objectives import TrainingObjective, check_seq_len, context_of, resolve_objective

Objective = Literal["auto", "lm", "hidden"]

_INT_FIELDS = ("tokens", "seq_len", "batch_size", "grad_accum", "eval_every", "eval_tokens", "save_every", "seed")
_FLOAT_FIELDS = ("lr", "min_lr_ratio", "warmup", "weight_decay", "eps", "grad_clip", "alpha", "temperature",
                 "hidden_mse", "hidden_cosine")


def _whole(name: str, value: Any) -> Any:
    """An int field: ints as they are, integral floats (1e6, as TOML and JSON write them) as ints;
    anything else (1e6 + 0.5, "8", True) is a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KronfactError(f"TrainConfig: {name} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise KronfactError(f"TrainConfig: {name} must be a whole number, got {value!r}")
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
                raise KronfactError(f"TrainConfig: {name} must be a number, got {value!r}")
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.betas):
            raise KronfactError(f"TrainConfig: betas must be two numbers, got {self.betas!r}")
        if self.warmup >= 1:
            if not float(self.warmup).is_integer():
                raise KronfactError(f"TrainConfig: warmup={self.warmup!r} is ambiguous: a value < 1 is a fraction of "
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
            raise KronfactError(f"TrainConfig: invalid {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")


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

    @property
    def initial_val(self) -> float | None:
        """The validation figure before any training (step 0), when validation data was given."""
        return next((h["val"] for h in self.history if h["step"] == 0 and "val" in h), None)

    def curve(self, key: str = "loss") -> list[tuple[int, float]]:
        """(step, value) for every history entry that has ``key``."""
        return [(int(h["step"]), h[key]) for h in self.history if key in h]


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


# ---------------------------------------------------------------------------------------------- training


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
        raise KronfactError(f"objective must be 'auto', 'lm' or 'hidden', got {kind!r}")
    if teacher is None and (kind == "hidden" or config.distill):
        raise KronfactError(f"the {'hidden-state distillation' if kind == 'hidden' else 'distillation'} objective "
                            "needs teacher=<the uncompressed model>")
    if not isinstance(data, Tensor) or data.dim() != 1 or data.is_floating_point():
        raise KronfactError("data must be a 1-D integer tensor of token ids (see kronfact.data.load_tokens)")
    seq_len = config.seq_len or context_of(model)
    if config.seq_len is not None:
        check_seq_len(model, config.seq_len)
    objective = TrainingObjective(kind, config, teacher)
    if data.numel() < objective.window(seq_len):
        raise KronfactError(f"data holds {data.numel()} tokens, fewer than one window of {objective.window(seq_len)}")
    if val_data is not None and config.eval_tokens is not None:
        val_data = val_data[:config.eval_tokens]
    frozen = [] if teacher is None else [p for p in teacher.parameters() if p.requires_grad]
    if teacher is not None:  # frozen while it teaches; the caller's flags come back afterwards
        teacher.to(device).eval().requires_grad_(False)

    d = init_distributed(device)
    try:
        return _train(model, data, config, objective, seq_len, val_data, callback, d, device)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if d.created:
            dist.destroy_process_group()


def _train(model: nn.Module, data: Tensor, config: TrainConfig, objective: TrainingObjective, seq_len: int,
           val_data: Tensor | None, callback: Callable[[dict[str, float]], None] | None, d: Dist,
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
        raise KronfactError("keep_best under FSDP reloads the best weights from disk: set out_dir")

    model.train()
    # the hidden objective leaves heads such as BERT's pooler without gradients: DDP must not wait for them
    wrapped = distributed.wrap(model, d, device, config.fsdp, find_unused=objective.kind == "hidden")
    optimizer = torch.optim.AdamW(param_groups(wrapped, config.weight_decay), lr=config.lr, betas=config.betas,
                                  eps=config.eps)
    history: list[dict[str, float]] = []
    best: list | None = None  # [step, val]
    best_state: dict[str, Tensor] | None = None  # in memory when there is no out_dir
    start = resumed_from = 0
    if out is not None and config.resume and (out / "last" / "state.json").exists():
        saved = resume.read_state(out / "last")
        resume.check_compatible(saved, {k: getattr(config, k) for k in resume.SCHEDULE_FIELDS}, d.world,
                                out / "last")
        resume.load_checkpoint(out / "last", wrapped, optimizer, d)
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
            entry.update(objective.validate(wrapped if sharded else unwrap(wrapped), val_data, seq_len, device))
        if best is None or entry["val"] < best[1]:
            best = [step, entry["val"]]
            if out is not None:
                resume.save_best(out / "best", wrapped, d, sharded)
            elif config.keep_best:
                best_state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

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
    bar_context = progress.training_bar(config.progress and d.main, total, start)
    with stack, torch.random.fork_rng(devices=rng_devices), bar_context as bar:
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
                torch.manual_seed(derived_seed(config.seed, d.rank, step, micro, 1))  # dropout
                batch = sample_windows(data, config.batch_size, objective.window(seq_len),
                                       derived_seed(config.seed, d.rank, step, micro)).to(device)
                with no_sync(wrapped, d.world > 1 and micro < config.grad_accum - 1), autocast:
                    loss = objective.loss(wrapped, batch)
                (loss / config.grad_accum).backward()
                loss_sum += loss.detach().float()
            grad_norm = _clip(wrapped, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            entry = {"step": step + 1, "tokens": (step + 1) * tokens_per_step,
                     "loss": all_mean(loss_sum / config.grad_accum, d), "lr": lr, "grad_norm": grad_norm}
            if step + 1 == total or (config.eval_every and (step + 1) % config.eval_every == 0):
                validate(step + 1, entry)
            record(entry)
            if out is not None and (step + 1 == total or (config.save_every and (step + 1) % config.save_every == 0)):
                resume.save_checkpoint(out / "last", wrapped, optimizer, meta(step + 1), d)
            if bar is not None:
                rate = (step + 1 - start) * tokens_per_step / (time.perf_counter() - t0)
                bar.update(bar.task_ids[0], completed=step + 1, info=f"loss {entry['loss']:.3f}  lr {lr:.2e}  "
                           f"{rate:,.0f} tok/s" + (f"  val {entry['val']:.3f}" if "val" in entry else ""))
            if callback is not None:
                callback(entry)

    if config.keep_best and best is not None and best[0] != total:
        if out is not None:
            resume.load_weights(wrapped, out / "best" / "model.safetensors", d)
        elif best_state is not None:
            unwrap(model).load_state_dict(best_state)
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


__all__ = ["TrainConfig", "TrainResult", "lr_at", "param_groups", "resolve_objective", "train"]

# Moved to their own modules; importable from here until the next minor release.
_MOVED = {"calibration_batches": "data", "load_tokens": "data", "sample_windows": "data", "TRAIN_DATASETS": "data",
          "embedding_cosine": "evaluate", "mean_pool": "evaluate", "distillation_loss": "objectives",
          "hidden_distillation_loss": "objectives"}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'kronfact.train' has no attribute {name!r}")
    warnings.warn(f"kronfact.train.{name} moved to kronfact.{_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
    if name == "TRAIN_DATASETS":
        return {k: DATASETS[k] for k in TRAIN_SETS}
    return getattr(importlib.import_module(f"kronfact.{_MOVED[name]}"), name)


class _CallableModule(types.ModuleType):
    """``kronfact.train`` is this module and, called, its :func:`train`: ``kronfact.train(model, ids, cfg)``
    and ``kronfact.train.TrainConfig`` both work."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
