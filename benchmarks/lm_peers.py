"""The peers of benchmarks/real_lm.py, each implemented from its paper's description (not its code).

Every function replaces the MLP matrices selected by ``RULES`` in place (or, for the depth student,
whole blocks) so that the model keeps about ``ratio`` of the MLP parameters:

- :func:`replace_low_rank`: plain SVD; ASVD (Yuan et al. 2023: SVD of W·S, S = diag(mean|x|)^0.5,
  then ·S⁻¹); SVD-LLM (Wang et al. 2024: SVD of W·L, L the Cholesky factor of XᵀX, then ·L⁻¹);
  FWSVD (Hsu et al. 2022: SVD of diag(√I)·W, I the per-row sum of squared loss gradients);
- :func:`neuron_prune`: Wanda/LLM-Pruner-style neuron score mean|h_j|·‖D[:, j]‖, one-shot, or block
  by block on the pruned model's own activations with a least-squares refit of the consumer (and
  kronfact's ablations: its OBS choice with the stream or the refit switched off);
- :func:`tensor_factorized`: ``tensorly-torch`` factorized linear layers (Tucker or block-TT, Novikov
  et al. 2015) initialised by decomposing each weight, at the parameter fraction ``ratio``;
- :func:`depth_student`: keep evenly spaced blocks (every other block at half depth) so that the whole
  model has the parameters of the others; a student to distil (Sanh et al. 2019, DistilBERT/DistilGPT2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kronfact.blocks import BlockRunner, block_stack, calibration_mode
from kronfact.modules import count_parameters, linear_weight
from kronfact.prune import DAMPING, NeuronGroup, obs_path, pruned_linear, refit
from kronfact.rules import select

RULES = ["mlp.*"]



def low_rank(w: Tensor, bias: Tensor | None, rank: int, left: Tensor | None = None,
             right: Tensor | None = None) -> nn.Sequential:
    """Two nn.Linear layers holding the rank-``rank`` SVD of left·W·right, unscaled: W ≈ left⁻¹·UΣVᵀ·right⁻¹."""
    x = w.double()
    x = x if left is None else left.double() @ x
    x = x if right is None else x @ right.double()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    us, v = u[:, :rank] * s[:rank], vh[:rank]
    if left is not None:
        us = torch.linalg.solve(left.double(), us)
    if right is not None:
        v = torch.linalg.solve(right.double().T, v.T).T
    first, second = nn.Linear(w.shape[1], rank, bias=False), nn.Linear(rank, w.shape[0], bias=bias is not None)
    with torch.no_grad():
        first.weight.copy_(v)
        second.weight.copy_(us)
        if bias is not None:
            second.bias.copy_(bias)
    return nn.Sequential(first, second).to(w.dtype)


def svd_rank(shape: tuple[int, int], ratio: float) -> int:
    out_f, in_f = shape
    return max(1, math.floor(ratio * out_f * in_f / (out_f + in_f)))


def input_stats(model: nn.Module, names: list[str], batches: list[Tensor]) -> dict[str, dict[str, Tensor]]:
    """Per layer: XᵀX / tokens and mean |x| of its inputs on the original model."""
    stats: dict[str, dict[str, Tensor]] = {n: {"gram": 0, "abs": 0, "n": 0} for n in names}
    hooks = []
    for n in names:
        def record(_m, args, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = stats[n]
            s["gram"], s["abs"], s["n"] = s["gram"] + x.T @ x, s["abs"] + x.abs().sum(0), s["n"] + x.shape[0]
        hooks.append(model.get_submodule(n).register_forward_pre_hook(record))
    with calibration_mode(model):
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {n: {"gram": s["gram"] / s["n"], "abs": s["abs"] / s["n"]} for n, s in stats.items()}


def row_fisher(model: nn.Module, names: list[str], batches: list[Tensor]) -> dict[str, Tensor]:
    """FWSVD's importance: per output row of each layer, Σ over its weights of the squared LM-loss gradient."""
    model.train(False).requires_grad_(True)
    acc = {n: torch.zeros(linear_weight(model.get_submodule(n)).shape[0], dtype=torch.float64) for n in names}
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(b, labels=b).loss.backward()
        for n in names:
            m = model.get_submodule(n)
            acc[n] += linear_weight(m).grad.double().pow(2).sum(1) if m.weight.grad is not None else 0
    model.zero_grad(set_to_none=True)
    return acc


def replace_low_rank(model: nn.Module, ratio: float, how: str, stats: dict, fisher: dict | None) -> None:
    for n in [t.name for t in select(model, RULES)]:
        m = model.get_submodule(n)
        w, r = linear_weight(m).detach(), svd_rank(tuple(linear_weight(m).shape), ratio)
        left = right = None
        if how == "asvd":
            right = torch.diag(stats[n]["abs"].clamp_min(1e-6) ** 0.5)
        elif how == "svdllm":
            g = stats[n]["gram"]
            right = torch.linalg.cholesky(g + 1e-6 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype))
        elif how == "fwsvd":
            left = torch.diag(fisher[n].clamp_min(1e-12) ** 0.5)
        model.set_submodule(n, low_rank(w, m.bias, r, left, right))


def neuron_prune(model: nn.Module, groups: list[NeuronGroup], keep: list[int], batches: list[Tensor], *,
                 score: str = "activation", sequential: bool = True, repair: bool = True) -> None:
    """Prune each group to ``keep[i]`` hidden neurons. ``score``: "activation" keeps the largest
    mean|h_j|·‖D[:, j]‖ (Wanda / LLM-Pruner), "obs" the greedy group-OBS choice (kronfact's).
    ``sequential``: statistics from the pruned model's own stream, block by block (else the original's);
    ``repair``: least-squares refit of the consumer D to the original MLP output (else D's kept columns).
    kronfact's ablations are this function with one of its ingredients switched off."""
    names = [n for g in groups for n in g.names]
    with calibration_mode(model):
        runner = BlockRunner(model, names, batches)
        stats = None if sequential else input_stats(model, [g.consumer.name for g in groups], batches)
        for i, g in enumerate(groups):
            b = runner.block_of(g.consumer.name)
            consumer = g.consumer.module
            d = linear_weight(consumer).detach()
            if sequential:
                acc = {"abs": 0, "gram": 0, "n": 0}

                def record(_m, args, acc=acc):
                    h = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                    acc["abs"], acc["gram"] = acc["abs"] + h.abs().sum(0), acc["gram"] + h.T @ h
                    acc["n"] += len(h)
                hook = consumer.register_forward_pre_hook(record)
                runner.run(b)
                hook.remove()
                absmean, gram = acc["abs"] / acc["n"], acc["gram"] / acc["n"]
            else:
                absmean, gram = stats[g.consumer.name]["abs"], stats[g.consumer.name]["gram"]
            if score == "obs":
                kept = obs_path(gram, d.double(), keep[i])[0]
            else:
                kept = torch.topk(absmean * d.double().norm(dim=0), keep[i]).indices.sort().values
            new_d = refit(gram, gram @ d.double().T, kept, 1e-4 if score == "activation" else DAMPING) \
                if repair else d[:, kept]
            for t in g.producers:
                pw = linear_weight(t.module).detach()
                pb = t.module.bias
                model.set_submodule(t.name, pruned_linear(pw[kept], None if pb is None else pb.detach()[kept], pw))
            model.set_submodule(g.consumer.name, pruned_linear(new_d.to(d.dtype), consumer.bias, d))
            if sequential:
                runner.advance(b)


def tensor_factorized(model: nn.Module, ratio: float, factorization: str) -> None:
    """Each MLP matrix → ``tltorch.FactorizedLinear`` (order-3 tensorization of in and out features)
    holding ``factorization`` ("tucker" or "blocktt") of the weight, with at most ``ratio`` of its
    parameters. Block-TT's first bond is full (rank i₀·o₀, the most TT-SVD can use); its second bond
    takes the rest of the budget. Tucker's ranks are tltorch's for the largest fraction that fits."""
    import tltorch
    from tltorch.utils import get_tensorized_shape

    for n in [t.name for t in select(model, RULES)]:
        m = model.get_submodule(n)
        w = linear_weight(m).detach()
        ins, outs = get_tensorized_shape(w.shape[1], w.shape[0], order=3, verbose=False)
        if factorization == "blocktt":
            r1 = ins[0] * outs[0]
            r2 = int((ratio * w.numel() - r1 * r1) // (r1 * ins[1] * outs[1] + ins[2] * outs[2]))
            rank = [1, r1, max(1, min(r2, ins[2] * outs[2])), 1]
        else:  # the largest fraction whose ranks fit (tltorch rounds the ranks, sometimes up)
            lo, hi = 0.0, ratio
            for _ in range(20):
                mid = (lo + hi) / 2
                fits = count_parameters(tltorch.FactorizedLinear(ins, outs, bias=False, factorization=factorization,
                                                                 rank=mid)) <= ratio * w.numel()
                lo, hi = (mid, hi) if fits else (lo, mid)
            rank = lo
        f = tltorch.FactorizedLinear(ins, outs, bias=False, factorization=factorization, rank=rank,
                                     implementation="reconstructed")
        with torch.no_grad():
            f.weight.init_from_matrix(w)
        if m.bias is not None:
            f.bias = nn.Parameter(m.bias.detach().clone())
        model.set_submodule(n, f.to(w.dtype))


def depth_student(model: nn.Module, target_params: float) -> None:
    """Keep the most evenly spaced blocks whose model has at most ``target_params`` parameters."""
    prefix, stack = block_stack(model, [t.name for t in select(model, RULES)])
    per_block = count_parameters(stack) / len(stack)
    fixed = count_parameters(model) - count_parameters(stack)
    n = max(1, min(len(stack), math.floor((target_params - fixed) / per_block)))
    keep = sorted({round(i * (len(stack) - 1) / max(1, n - 1)) for i in range(n)}) if n > 1 else [0]
    kept = nn.ModuleList([stack[i] for i in keep])
    for i, block in enumerate(kept):  # KV-cache slots follow the new order
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i
    model.set_submodule(prefix, kept)
    config = getattr(model, "config", None)
    if config is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(config, key):
                setattr(config, key, len(kept))
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in keep]
