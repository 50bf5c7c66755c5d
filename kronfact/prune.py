"""Structured neuron pruning of MLPs, calibrated block by block, with a closed-form refit.

An MLP hidden neuron j lives in row j of every producer (GPT-2 ``c_fc``; Llama ``gate_proj`` and
``up_proj``; BERT ``intermediate.dense``) and in column j of the consumer (``c_proj``, ``down_proj``,
``output.dense``). Dropping a set of neurons is W ≈ A ⊗ B with a one-hot B after a permutation —
Krony-PT's pruning init with importance-chosen rows instead of a stride — and its result is a
smaller dense layer: no gathers at run time (:class:`PrunedLinear`).

For each group, in model order (:class:`kronfact.blocks.BlockRunner`), on the inputs that the
already-pruned blocks produce:

1. H (tokens, hidden): the consumer's input, through the *original* producers; the target is the
   original MLP's output T = H·Dᵀ (+ bias), D the consumer's weight (out, hidden).
2. Which neurons: Optimal Brain Surgeon for a group of columns (as in ZipLM / SparseGPT, structured).
   With G = HᵀH (damped), removing neuron j from the least-squares fit raises ‖T − H_S·W_Sᵀ‖² by
   ‖W[:, j]‖² / [G⁻¹]_jj; neurons go greedily in chunks, W and G⁻¹ updated after each chunk.
3. Refit: W_S = T·H_S·(H_SᵀH_S)⁻¹ — the consumer restricted to the kept neurons is re-solved by least
   squares so the block reproduces the original MLP output (GPTQ / SVD-LLM-style local repair).

The number of neurons kept per group is the budget's: :func:`uniform_keep` spreads it evenly. (A
Fisher-weighted allocation — the OBS paths weighted by the loss's Fisher diagonal at each MLP output,
shared out by the knapsack solver — was measured and did worse on SmolLM2: it starved late blocks.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.progress import track
from torch import Tensor, nn

from .blocks import BlockRunner, calibration_mode
from .calibrate import check_token_batches, damped
from .errors import KronfactError
from .modules import count_parameters, is_conv1d, linear_weight
from .report import CompressionReport, LayerReport
from .rules import Target

# Relative damping of the hidden Gram: G + δ·mean(diag G)·I.
DAMPING = 1e-2
# Kept neurons are rounded to a multiple of this (GEMM-friendly sizes).
MULTIPLE = 8
# Neurons removed per OBS step.
CHUNK = 32


class PrunedLinear(nn.Linear):
    """An nn.Linear that replaced a larger nn.Linear / Conv1D after neuron pruning (same forward, fewer
    features). The class marks it for :mod:`kronfact.io`, which records its new size so the model reloads."""


@dataclass(frozen=True)
class NeuronGroup:
    """The layers that share one MLP hidden dimension: producers (hidden, d) and a consumer (d, hidden)."""

    producers: tuple[Target, ...]
    consumer: Target
    hidden: int

    @property
    def names(self) -> list[str]:
        return [t.name for t in (*self.producers, self.consumer)]

    @property
    def params(self) -> int:
        """Parameters of the group's layers (weights and biases)."""
        return sum(p.numel() for t in (*self.producers, self.consumer) for p in t.module.parameters())

    def params_at(self, keep: int) -> int:
        """Parameters of the group with ``keep`` hidden neurons."""
        per = sum(linear_weight(t.module).shape[1] + (t.module.bias is not None) for t in self.producers)
        per += linear_weight(self.consumer.module).shape[0]
        consumer_bias = self.consumer.module.bias
        return keep * per + (consumer_bias.numel() if consumer_bias is not None else 0)


def _block_key(name: str) -> str:
    """The name up to its last numeric segment: "model.layers.3.mlp.up_proj" → "model.layers.3"."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[:digits[-1] + 1]) if digits else ""


def neuron_groups(targets: Sequence[Target]) -> tuple[list[NeuronGroup], list[Target]]:
    """Split selected layers into MLP neuron groups and the rest.

    Within one block (names up to the last numeric segment), a hidden size h forms a group when exactly
    one layer consumes it (in_features = h) and the layers producing it (out_features = h, registered
    before the consumer) read the consumer's output width: d → h → d, h ≠ d. Attention projections
    (d → d) never form one.
    """
    blocks: dict[str, list[Target]] = {}
    for t in targets:
        blocks.setdefault(_block_key(t.name), []).append(t)
    groups, grouped = [], set()
    for members in blocks.values():
        shapes = {t.name: tuple(linear_weight(t.module).shape) for t in members}
        for h in sorted({s[0] for s in shapes.values()}):
            consumers = [t for t in members if shapes[t.name][1] == h and shapes[t.name][0] != h]
            if len(consumers) != 1:
                continue
            d, after = shapes[consumers[0].name][0], members.index(consumers[0])
            producers = [t for t in members[:after] if shapes[t.name] == (h, d)]
            if producers and not grouped & {t.name for t in (*producers, consumers[0])}:
                groups.append(NeuronGroup(tuple(producers), consumers[0], h))
                grouped |= {t.name for t in (*producers, consumers[0])}
    rest = [t for t in targets if t.name not in grouped]
    order = {t.name: i for i, t in enumerate(targets)}
    groups.sort(key=lambda g: order[g.consumer.name])
    return groups, rest


def uniform_keep(groups: Sequence[NeuronGroup], spare: int) -> list[int]:
    """Neurons kept per group: the same fraction of each hidden size (rounded down to ``MULTIPLE``), the
    largest whose parameters fit ``spare``; the leftover goes to groups in order, ``MULTIPLE`` at a time."""
    def keeps(q: float) -> list[int]:
        return [max(MULTIPLE, int(q * g.hidden) // MULTIPLE * MULTIPLE) if g.hidden > MULTIPLE else g.hidden
                for g in groups]

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        fits = sum(g.params_at(k) for g, k in zip(groups, keeps(mid), strict=True)) <= spare
        lo, hi = (mid, hi) if fits else (lo, mid)
    keep = keeps(lo)
    used = sum(g.params_at(k) for g, k in zip(groups, keep, strict=True))
    for i, g in enumerate(groups):
        extra = g.params_at(keep[i] + MULTIPLE) - g.params_at(keep[i])
        if keep[i] + MULTIPLE <= g.hidden and used + extra <= spare:
            keep[i], used = keep[i] + MULTIPLE, used + extra
    return keep


# ------------------------------------------------------------------------------------ the math


def obs_path(gram: Tensor, weight: Tensor, keep: int, *, fixed: int = 0, damping: float = DAMPING,
             chunk: int = CHUNK) -> tuple[Tensor, list[tuple[int, float]]]:
    """Greedy group OBS: the ``keep`` columns of ``weight`` (out, n) to keep, and the cost path.

    ``gram`` (n, n) is HᵀH of the inputs; the last ``fixed`` columns (e.g. a bias column of ones) are
    always kept. Each step drops the ``chunk`` columns j of least ‖W[:, j]‖² / [G⁻¹]_jj, then updates
    W and G⁻¹ as if those columns had been removed
    from the least-squares fit (Schur complement). Returns the kept indices (sorted) and
    [(columns left, cumulative increase of ‖T − H·Wᵀ‖²)] after every step, from (n − fixed, 0).

    >>> g = torch.eye(4, dtype=torch.float64); w = torch.tensor([[1.0, 5.0, 0.1, 3.0]], dtype=torch.float64)
    >>> obs_path(g, w, 2, chunk=1)[0].tolist()
    [1, 3]
    """
    n = gram.shape[0]
    if not 0 < keep <= n - fixed:
        raise KronfactError(f"keep must be in [1, {n - fixed}], got {keep}")
    alive = torch.arange(n, device=gram.device)
    inv = torch.linalg.inv(damped(gram.double(), damping))
    w = weight.double().clone()
    path, total = [(n - fixed, 0.0)], 0.0
    while alive.numel() > keep + fixed:
        removable = alive.numel() - fixed
        score = (w[:, :removable] ** 2).sum(0) / inv.diagonal()[:removable]
        drop = torch.topk(score, min(chunk, removable - keep), largest=False).indices
        inv_dd, w_d = inv[drop][:, drop], w[:, drop]
        solve = torch.linalg.solve(inv_dd, inv[drop])  # (step, n_alive)
        total += float((torch.linalg.solve(inv_dd, w_d.T) * w_d.T).sum())  # tr(W_D·[G⁻¹]_DD⁻¹·W_Dᵀ)
        w = w - w[:, drop] @ solve
        inv = inv - inv[:, drop] @ solve
        mask = torch.ones(alive.numel(), dtype=torch.bool, device=gram.device)
        mask[drop] = False
        alive, w, inv = alive[mask], w[:, mask], inv[mask][:, mask]
        path.append((alive.numel() - fixed, total))
    return (alive[:alive.numel() - fixed] if fixed else alive), path


def refit(gram: Tensor, cross: Tensor, kept: Tensor, damping: float = DAMPING) -> Tensor:
    """Least-squares consumer on the kept inputs: W (out, |kept|) minimising ‖T − H_S·Wᵀ‖², ridge-damped.

    ``gram`` = HᵀH (n, n), ``cross`` = HᵀT (n, out).
    """
    g = damped(gram.double()[kept][:, kept], damping)
    return torch.linalg.solve(g, cross.double()[kept]).T


# --------------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class PrunedGroup:
    """What pruning did to one group: kept neuron indices and the relative error of the MLP output."""

    group: NeuronGroup
    kept: Tensor
    rel_error: float
    layers: dict[str, PrunedLinear]


def _capture(runner: BlockRunner, index: int, module: nn.Module,
             keep_inputs: bool = False) -> tuple[Tensor, int, list[Tensor], list[Tensor | None]]:
    """While block ``index`` runs: HᵀH of ``module``'s inputs (plus a column of ones when it has a bias),
    the token count, the inputs themselves when ``keep_inputs`` (else []), and the block's outputs."""
    state: dict[str, Any] = {"gram": None, "tokens": 0}
    kept: list[Tensor] = []
    bias = getattr(module, "bias", None) is not None

    def record(_m: nn.Module, args: tuple) -> None:
        h = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if not bool(torch.isfinite(h).all()):
            raise KronfactError("calibration produced non-finite activations (NaN/inf); check the model and batches")
        if bias:
            h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], 1)
        g = (h.T @ h).double()
        state["gram"] = g if state["gram"] is None else state["gram"] + g
        state["tokens"] += h.shape[0]
        if keep_inputs:
            kept.append(h)

    handle = module.register_forward_pre_hook(record)
    try:
        outputs = runner.run(index)
    finally:
        handle.remove()
    return state["gram"], state["tokens"], kept, outputs


def pruned_linear(weight: Tensor, bias: Tensor | None, like: Tensor) -> PrunedLinear:
    """A :class:`PrunedLinear` holding ``weight`` (out, in) and ``bias``, on ``like``'s device and dtype."""
    out_f, in_f = weight.shape
    layer = PrunedLinear(in_f, out_f, bias=bias is not None, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _prune_group(group: NeuronGroup, gram: Tensor, keep: int, damping: float,
                 shift: Tensor | None = None) -> PrunedGroup:
    """Select ``keep`` neurons of ``group`` by OBS on ``gram`` and build its smaller layers, refitted to
    T = H·Dᵀ (+ bias), plus the correction whose cross term with H is ``shift`` = HᵀΔ / tokens."""
    consumer = group.consumer.module
    d_weight = linear_weight(consumer).detach()
    bias = consumer.bias
    w = d_weight.double()
    if bias is not None:  # the bias is the weight of an always-kept input of ones
        w = torch.cat([w, bias.detach().double()[:, None]], 1)
    fixed = int(bias is not None)
    kept, _ = obs_path(gram, w, keep, fixed=fixed, damping=damping)
    cols = torch.cat([kept, torch.arange(group.hidden, group.hidden + fixed, device=kept.device)])
    cross = gram @ w.T  # HᵀT with T = H·Wᵀ: the original consumer's output
    if shift is not None:
        cross = cross + shift
    new = refit(gram, cross, cols, damping)
    total = float((w @ gram @ w.T).trace())
    # ‖T − H_S·W_Sᵀ‖² = tr(W G Wᵀ) − 2 tr(W G_{·S} W_Sᵀ) + tr(W_S G_SS W_Sᵀ)
    err = total - 2 * float((w @ gram[:, cols] @ new.T).trace()) + float((new @ gram[cols][:, cols] @ new.T).trace())
    rel = math.sqrt(max(err, 0.0) / total) if total > 0 else 0.0
    like = d_weight
    layers = {}
    for t in group.producers:
        pw = linear_weight(t.module).detach()
        pb = t.module.bias
        layers[t.name] = pruned_linear(pw[kept], None if pb is None else pb.detach()[kept], pw)
    layers[group.consumer.name] = pruned_linear(new[:, :keep].to(like.dtype),
                                          None if bias is None else new[:, keep].to(like.dtype), like)
    return PrunedGroup(group, kept, rel, layers)


def prune_neurons(model: nn.Module, groups: Sequence[NeuronGroup], keep: Sequence[int], batches: Iterable[Any], *,
                  damping: float = DAMPING, compensate: bool = False, progress: bool = True) -> list[PrunedGroup]:
    """Prune every group to ``keep[i]`` neurons, block by block on ``batches``, in place; undone on error.

    Each group is calibrated on the hidden states that the already-pruned blocks produce (module
    docstring); its layers are swapped for :class:`PrunedLinear` before the next block runs. With
    ``compensate`` (and a block stack, one group per block) the refit target also carries the drift
    of the block's output from the original model's, O_orig − O_pruned-so-far, so each block repairs
    the error of the blocks before it. On any exception every swapped layer is put back, so the model
    is unchanged.
    """
    names = [n for g in groups for n in g.names]
    done: list[PrunedGroup] = []
    swapped: list[tuple[str, nn.Module]] = []
    try:
        with calibration_mode(model):
            runner = BlockRunner(model, names, batches)
            by_block: dict[int, list[int]] = {}
            for i, g in enumerate(groups):
                by_block.setdefault(runner.block_of(g.consumer.name), []).append(i)
            compensate = compensate and bool(runner.prefix) and all(len(v) == 1 for v in by_block.values())
            original = runner.fork() if compensate else None
            steps = list(range(len(runner.blocks)))
            for b in track(steps, description="kronfact: pruning neurons", disable=not progress, transient=True):
                target = original.run(b) if original is not None else None
                for i in by_block.get(b, []):
                    gram, tokens, inputs, outputs = _capture(runner, b, groups[i].consumer.module, compensate)
                    if tokens == 0:
                        raise KronfactError(f"no calibration tokens reached {groups[i].consumer.name}")
                    shift = None
                    if target is not None:
                        drift = torch.cat([(t - o).reshape(-1, t.shape[-1]) for t, o in zip(target, outputs,
                                                                                         strict=True)]).float()
                        shift = (torch.cat(inputs).T @ drift).double() / tokens
                    result = _prune_group(groups[i], gram / tokens, keep[i], damping, shift)
                    for t in (*groups[i].producers, groups[i].consumer):
                        for name in t.names:
                            swapped.append((name, model.get_submodule(name)))
                            model.set_submodule(name, result.layers[t.name])
                    done.append(result)
                if by_block.get(b) or b < max(by_block, default=-1):
                    runner.advance(b)
                    if original is not None:
                        original.advance(b, target)
                if b >= max(by_block, default=-1):
                    break
    except BaseException:
        for name, module in reversed(swapped):
            model.set_submodule(name, module)
        raise
    return done


def compress_neurons(model: nn.Module, groups: list[NeuronGroup], budget: float | None, ratio: float | None,
                     calibration: list[Any], compensate: bool = False, progress: bool = True) -> CompressionReport:
    """``compress(method="neurons")`` once its options are checked: prune ``groups`` (every selected layer)
    to ``budget`` total parameters, or ``ratio`` of the groups' parameters, on the ``calibration`` batches."""
    tokens = check_token_batches(model, calibration)
    before = count_parameters(model)
    selected = sum(g.params for g in groups)
    fixed = before - selected
    target = int(budget) if budget is not None else fixed + math.floor(ratio * selected)
    smallest = fixed + sum(g.params_at(min(g.hidden, MULTIPLE)) for g in groups)
    if not smallest <= target:
        raise KronfactError(f"budget {target:,} is out of reach for neuron pruning: the smallest model keeps "
                            f"{smallest:,} parameters ({MULTIPLE} neurons per MLP), the original has {before:,}")
    keep = uniform_keep(groups, target - fixed)
    todo = [i for i, (g, k) in enumerate(zip(groups, keep, strict=True)) if k < g.hidden]
    most = max((keep[i] for i in todo), default=0)
    if tokens < most:
        raise KronfactError(f"calibration holds {tokens:,} tokens, fewer than the {most:,} neurons kept in an MLP: the "
                            "least-squares refit is underdetermined; give more (e.g. 32 windows of 256 tokens)")
    done = prune_neurons(model, [groups[i] for i in todo], [keep[i] for i in todo], calibration,
                         compensate=compensate, progress=progress) if todo else []
    rows = []
    for result in done:
        for t in (*result.group.producers, result.group.consumer):
            new = result.layers[t.name]
            rows.append(LayerReport(t.name, tuple(linear_weight(t.module).shape), tuple(new.weight.shape), (1, 1), 1,
                                    "neurons", sum(p.numel() for p in t.module.parameters()),
                                    sum(p.numel() for p in new.parameters()), result.rel_error,
                                    "conv1d" if is_conv1d(t.module) else "linear", t.aliases))
    kept = [n for i, g in enumerate(groups) if i not in todo for n in g.names]
    return CompressionReport(rows, before, count_parameters(model), kept, target)
