"""Real pretrained LM: kronfact against its peers at equal parameters, no training (and optional recovery).

SmolLM2-135M (build it with ``python ../shared/tools/smollm2.py DIR``; any causal LM folder with gated or
plain MLPs works), its MLP matrices compressed to a budget, validation perplexity on Shakespeare
val.txt (context 512, non-overlapping windows, token-weighted, the first ``--eval-tokens`` tokens).
Calibration: ``--cal-windows`` random windows of ``--cal-len`` tokens from train.txt (seed 0); every
data-aware method sees the same batches. Parameters are counted in full (every tensor once).

Peers, each implemented from its paper's description:
- plain SVD: truncated SVD of every matrix at the rank that fits the budget;
- ASVD (Yuan et al. 2023): SVD of W·S, S = diag(mean|x|)^0.5 from calibration inputs, then ·S⁻¹;
- SVD-LLM (Wang et al. 2024): SVD of W·L, L the Cholesky factor of XᵀX (truncation-aware whitening), then ·L⁻¹;
- FWSVD (Hsu et al. 2022): SVD of diag(√I)·W, I the per-row sum of squared loss gradients on calibration data;
- activation-ranked neuron pruning (Wanda/LLM-Pruner-style score mean|h_j|·‖D[:, j]‖), one-shot;
- the same, block by block on the pruned model's own activations, with a least-squares refit of the consumer;
- Krony-PT-style uniform Kronecker, A 768×288 ⊗ B 2×2 (and transposed), Van Loan and pruning init;
- kronfact's previous default: the Kronecker/low-rank budget solver on activation-calibrated curves;
- kronfact (``compress(..., calibration=)``): group OBS neuron pruning, sequential, refit.

    python benchmarks/real_lm.py --model /path/to/smollm2                   # writes the "real_lm" section
    python benchmarks/real_lm.py --model DIR --budgets 0.5 --methods kronfact,seq_prune --no-write
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

import kronfact  # noqa: E402
from kronfact.blocks import BlockRunner, calibration_mode  # noqa: E402
from kronfact.evaluate import load_tokenizer, perplexity, tokenize_file  # noqa: E402
from kronfact.modules import count_parameters, linear_weight  # noqa: E402
from kronfact.prune import NeuronGroup, PrunedLinear, neuron_groups, refit, uniform_keep  # noqa: E402
from kronfact.rules import select  # noqa: E402
from kronfact.train import sample_windows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "shakespeare"
RULES = ["mlp.*"]
KRONY_SHAPE = (768, 288)  # of a 1536×576 up/gate; the 576×1536 down takes its transpose; B is 2×2


# ------------------------------------------------------------------------------------ shared pieces


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
    model.train(False)
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


def activation_prune(model: nn.Module, groups: list[NeuronGroup], keep: list[int], batches: list[Tensor],
                     sequential: bool) -> None:
    """Keep the neurons of largest mean|h_j|·‖D[:, j]‖; sequential: on the pruned model's stream + LS refit."""
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
                absmean = stats[g.consumer.name]["abs"]
            kept = torch.topk(absmean * d.double().norm(dim=0), keep[i]).indices.sort().values
            new_d = refit(gram, gram @ d.double().T, kept, 1e-4).to(d.dtype) if sequential else d[:, kept]
            for t in g.producers:
                pw = linear_weight(t.module).detach()
                lin = PrunedLinear(pw.shape[1], keep[i], bias=t.module.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(pw[kept])
                    if t.module.bias is not None:
                        lin.bias.copy_(t.module.bias[kept])
                model.set_submodule(t.name, lin)
            lin = PrunedLinear(keep[i], d.shape[0], bias=consumer.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(new_d)
                if consumer.bias is not None:
                    lin.bias.copy_(consumer.bias)
            model.set_submodule(g.consumer.name, lin)
            if sequential:
                runner.advance(b)


# ----------------------------------------------------------------------------------------- methods


def methods(ratio: float, batches: list[Tensor], stats: Callable[[nn.Module], dict],
            fisher: Callable[[nn.Module], dict]) -> dict[str, Callable[[nn.Module], None]]:
    def groups_keep(model):
        groups, _ = neuron_groups(select(model, RULES))
        return groups, uniform_keep(groups, int(ratio * sum(g.params for g in groups)))

    def krony(init):
        def run(model):
            r = max(1, round(ratio * 4))  # A 768×288 ⊗ B 2×2: one term ≈ 25% of the matrix
            kronfact.compress(model, {"gate_proj": {"shape_a": KRONY_SHAPE}, "up_proj": {"shape_a": KRONY_SHAPE},
                                      "down_proj": {"shape_a": KRONY_SHAPE[::-1]}}, rank=r, init=init, progress=False)
        return run

    return {
        "svd": lambda m: replace_low_rank(m, ratio, "svd", {}, None),
        "asvd": lambda m: replace_low_rank(m, ratio, "asvd", stats(m), None),
        "svdllm": lambda m: replace_low_rank(m, ratio, "svdllm", stats(m), None),
        "fwsvd": lambda m: replace_low_rank(m, ratio, "fwsvd", {}, fisher(m)),
        "act_prune": lambda m: activation_prune(m, *groups_keep(m), batches, sequential=False),
        "seq_prune": lambda m: activation_prune(m, *groups_keep(m), batches, sequential=True),
        "krony_vanloan": krony("vanloan"),
        "krony_prune": krony("prune"),
        "kron_solver": lambda m: kronfact.compress(m, RULES, ratio=ratio, method="kron", calibration=batches,
                                                   progress=False),
        "kronfact": lambda m: kronfact.compress(m, RULES, ratio=ratio, calibration=batches, progress=False),
        "kronfact_compensate": lambda m: kronfact.compress(m, RULES, ratio=ratio, calibration=batches,
                                                           progress=False, compensate=True),
    }


LABELS = {
    "original": "original", "svd": "plain SVD", "asvd": "ASVD (activation-scaled SVD)",
    "svdllm": "SVD-LLM (whitened truncation)", "fwsvd": "FWSVD (Fisher-weighted SVD)",
    "act_prune": "activation-ranked neuron pruning, one-shot",
    "seq_prune": "activation-ranked neuron pruning, sequential + LS refit",
    "krony_vanloan": "Krony-PT uniform 768×288 ⊗ 2×2, Van Loan", "krony_prune": "Krony-PT uniform, pruning init",
    "kron_solver": "kronfact Kronecker/low-rank solver, calibrated curves (0.1 default)",
    "kronfact": "**kronfact** (group OBS neuron pruning, sequential, refit)",
    "kronfact_compensate": "kronfact + drift compensation in the refit target",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--ratios", default="0.5,0.25", help="fractions of the MLP parameters kept")
    parser.add_argument("--methods", default=",".join(LABELS))
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--cal-windows", type=int, default=32)
    parser.add_argument("--cal-len", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--resume", type=Path, help="a JSON-lines log of an earlier run (this script's stdout): "
                        "its rows are kept and their (method, ratio) pairs are not run again")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    tok = load_tokenizer(args.model)
    val = tokenize_file(DATA / "val.txt", tok)[:args.eval_tokens + 1]
    train = tokenize_file(DATA / "train.txt", tok)
    batches = list(sample_windows(train, args.cal_windows, args.cal_len, seed=0).split(8))
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    total = count_parameters(base)
    mlp = sum(p.numel() for t in select(base, RULES) for p in t.module.parameters())
    rows = [json.loads(line) for line in args.resume.read_text().splitlines() if line.startswith("{")] \
        if args.resume else []
    done = {(r["method"], r["ratio"]) for r in rows}

    def measure(name: str, ratio: float | None, fn: Callable[[nn.Module], None] | None) -> None:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if fn is not None:
            fn(model)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, val, context=512, stride=512, batch_size=8)
        row = {"method": name, "ratio": ratio, "params": count_parameters(model), "ppl": ppl, "seconds": seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)

    stats_cache, fisher_cache = {}, {}

    def stats(model):
        if not stats_cache:
            stats_cache.update(input_stats(base, [t.name for t in select(base, RULES)], batches))
        return stats_cache

    def fisher(model):
        if not fisher_cache:
            fisher_cache.update(row_fisher(copy.deepcopy(base), [t.name for t in select(base, RULES)], batches))
        return fisher_cache

    wanted = args.methods.split(",")
    if "original" in wanted and ("original", None) not in done:
        measure("original", None, None)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for name, fn in methods(ratio, batches, stats, fisher).items():
            if name in wanted and (name, ratio) not in done:
                measure(name, ratio, fn)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    original = next((r["ppl"] for r in rows if r["method"] == "original"), None)
    lines = [f"`python benchmarks/real_lm.py --model SMOLLM2 --ratios {args.ratios} --eval-tokens {args.eval_tokens}`"
             f" — {machine()}.", "",
             f"{args.model.name}: {total:,} parameters, MLPs {mlp:,}. Perplexity on the first {args.eval_tokens:,} "
             f"tokens of val.txt (context 512, token-weighted); calibration {args.cal_windows}×{args.cal_len} tokens "
             "of train.txt, seed 0. No training. Seconds: compress wall time (2 cores).", "",
             "| MLP kept | method | params (total) | perplexity | × original | seconds |", "|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(LABELS)}
    for r in sorted(rows, key=lambda r: (-(r["ratio"] or 2), order[r["method"]])):
        rel = f"{r['ppl'] / original:.2f}" if original else ""
        kept = "—" if r["ratio"] is None else f"{r['ratio']:.0%}"
        lines.append(f"| {kept} | {LABELS[r['method']]} | {r['params']:,} | {r['ppl']:.2f} | {rel} "
                     f"| {r['seconds']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("real_lm", text)


if __name__ == "__main__":
    main()
