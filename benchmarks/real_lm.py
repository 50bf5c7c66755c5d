"""Real pretrained LM: kronfact against its peers at equal parameters, no training and after recovery.

SmolLM2-135M (build it with ``python ../shared/tools/smollm2.py DIR``; any causal LM folder with gated or
plain MLPs works), its MLP matrices compressed to a budget, validation perplexity on Shakespeare
val.txt (context 512, non-overlapping windows, token-weighted, the first ``--eval-tokens`` tokens).
A budget ≤ 1 is the fraction of the MLP parameters kept; a budget > 1 is the whole model's parameter
count (100e6), met by compressing the MLPs. Calibration: ``--cal-windows`` random windows of
``--cal-len`` tokens from train.txt (seed 0); every data-aware method sees the same batches.
Parameters are counted in full (every tensor once). The peers are in ``lm_peers.py``.

Recovery (``--recover-tokens N``): the rows of ``--recover-methods`` at ``--recover-budgets`` are then
distilled from the original for N tokens of train.txt (kronfact.train: (1−α)·CE + α·T²·KL, α 0.5, T 2;
windows of 256, batch 4, AdamW lr 1e-4, 10% warmup, cosine; seed 0; the final weights, no selection)
and evaluated again. Every recovered row sees the same tokens in the same order. The training text is
in-domain, so part of any gain is adaptation to it: ``--recover-original`` distils the uncompressed
model the same way, for reference.

    python benchmarks/real_lm.py --model /path/to/smollm2 --plot benchmarks/real_lm.png   # writes "real_lm"
    python benchmarks/real_lm.py --model DIR --budgets 0.5 --methods kronfact,seq_prune --no-write
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_peers as peers  # noqa: E402
from results import machine, write_section  # noqa: E402

import kronfact  # noqa: E402
from kronfact.data import (  # noqa: E402
    calibration_batches,  # noqa: E402
    load_tokenizer,
    tokenize_file,
)
from kronfact.evaluate import perplexity  # noqa: E402
from kronfact.modules import count_parameters  # noqa: E402
from kronfact.prune import neuron_groups, uniform_keep  # noqa: E402
from kronfact.rules import select  # noqa: E402
from kronfact.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "shakespeare"
KRONY_SHAPE = (768, 288)  # of a 1536×576 up/gate; the 576×1536 down takes its transpose; B is 2×2


# ----------------------------------------------------------------------------------------- methods


def methods(ratio: float, target: float, batches: list[Tensor], stats: Callable[[nn.Module], dict],
            fisher: Callable[[nn.Module], dict]) -> dict[str, Callable[[nn.Module], None]]:
    """Every row's compression at ``ratio`` of the MLP parameters (``target``: the whole model's count)."""
    def pruned(**options):
        def run(model):
            groups, _ = neuron_groups(select(model, peers.RULES))
            keep = uniform_keep(groups, int(ratio * sum(g.params for g in groups)))
            peers.neuron_prune(model, groups, keep, batches, **options)
        return run

    def krony(init):
        def run(model):
            r = max(1, round(ratio * 4))  # A 768×288 ⊗ B 2×2: one term ≈ 25% of the matrix
            kronfact.compress(model, {"gate_proj": {"shape_a": KRONY_SHAPE}, "up_proj": {"shape_a": KRONY_SHAPE},
                                      "down_proj": {"shape_a": KRONY_SHAPE[::-1]}}, rank=r, init=init, progress=False)
        return run

    def ours(**options):
        return lambda m: kronfact.compress(m, peers.RULES, ratio=ratio, calibration=batches, progress=False, **options)

    return {
        "svd": lambda m: peers.replace_low_rank(m, ratio, "svd", {}, None),
        "asvd": lambda m: peers.replace_low_rank(m, ratio, "asvd", stats(m), None),
        "svdllm": lambda m: peers.replace_low_rank(m, ratio, "svdllm", stats(m), None),
        "fwsvd": lambda m: peers.replace_low_rank(m, ratio, "fwsvd", {}, fisher(m)),
        "act_prune": pruned(sequential=False, repair=False),
        "seq_prune": pruned(sequential=True, repair=True),
        "krony_vanloan": krony("vanloan"),
        "krony_prune": krony("prune"),
        "tucker": lambda m: peers.tensor_factorized(m, ratio, "tucker"),
        "blocktt": lambda m: peers.tensor_factorized(m, ratio, "blocktt"),
        "depth": lambda m: peers.depth_student(m, target),
        "kron_solver": ours(method="kron", error_weights="calibrated"),
        "kronfact": ours(),
        "no_repair": pruned(score="obs", sequential=True, repair=False),
        "no_stream": pruned(score="obs", sequential=False, repair=True),
        "kronfact_compensate": ours(compensate=True),
    }


LABELS = {
    "original": "original", "svd": "plain SVD", "asvd": "ASVD (activation-scaled SVD)",
    "svdllm": "SVD-LLM (whitened truncation)", "fwsvd": "FWSVD (Fisher-weighted SVD)",
    "act_prune": "activation-ranked neuron pruning, one-shot",
    "seq_prune": "activation-ranked neuron pruning, sequential + LS refit (= kronfact − OBS choice)",
    "krony_vanloan": "Krony-PT uniform 768×288 ⊗ 2×2, Van Loan", "krony_prune": "Krony-PT uniform, pruning init",
    "tucker": "tensorly-torch Tucker (order-3 tensorized)", "blocktt": "tensorly-torch block-TT (order-3)",
    "depth": "depth student (evenly spaced blocks)",
    "kron_solver": "kronfact Kronecker/low-rank solver, calibrated curves",
    "kronfact": "**kronfact** (group OBS neuron pruning, sequential, refit)",
    "no_repair": "kronfact − refit (OBS choice, sequential, D's kept columns)",
    "no_stream": "kronfact − sequential (OBS + refit on the original's activations)",
    "kronfact_compensate": "kronfact + drift compensation in the refit target",
}


def recover(model: nn.Module, teacher: nn.Module, ids: Tensor, tokens: int) -> float:
    """Distil ``model`` from ``teacher`` for ``tokens`` tokens of ``ids`` (module docstring); wall seconds."""
    start = time.perf_counter()
    config = TrainConfig(tokens=tokens, seq_len=256, batch_size=4, lr=1e-4, warmup=0.1, distill=True, alpha=0.5,
                         temperature=2.0, seed=0, progress=sys.stderr.isatty())
    train(model, ids, config, teacher=teacher)
    model.eval()
    return time.perf_counter() - start


def plot(rows: list[dict], original: float, path: Path) -> None:
    """Perplexity against parameters, one line per method (solid: no training; dashed: recovered).
    Methods never within 100× of the original are named in a note instead of drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    colors = plt.get_cmap("tab20").colors
    off = []
    for i, method in enumerate(m for m in LABELS if m != "original"):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["params"])
        if not mine:
            continue
        label = LABELS[method].replace("**", "")
        if min(r.get("recovered_ppl", r["ppl"]) for r in mine) > 100 * original:
            off.append(label)
            continue
        style = {"color": "crimson", "lw": 2.5} if method == "kronfact" else {"color": colors[i % 20], "lw": 1}
        ax.plot([r["params"] / 1e6 for r in mine], [r["ppl"] for r in mine], "o-", label=label, **style)
        rec = [r for r in mine if "recovered_ppl" in r]
        if rec:
            ax.plot([r["params"] / 1e6 for r in rec], [r["recovered_ppl"] for r in rec], "s--", **style)
    ax.axhline(original, color="k", lw=0.8, label="original")
    ax.set(xlabel="parameters (millions, total)", ylabel="validation perplexity (log)", yscale="log",
           ylim=(original * 0.8, original * 100), title="SmolLM2-135M, MLPs compressed (squares, dashed: after "
           "recovery)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    if off:
        fig.text(0.01, 0.01, "above 100× the original at every size: " + "; ".join(off), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--budgets", default="0.5,0.25,100e6",
                        help="≤ 1: fraction of the MLP parameters kept; > 1: the whole model's parameters")
    parser.add_argument("--methods", default=",".join(LABELS))
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--cal-windows", type=int, default=32)
    parser.add_argument("--cal-len", type=int, default=256)
    parser.add_argument("--recover-tokens", type=int, default=0, help="distillation tokens per recovered row")
    parser.add_argument("--recover-methods", default="kronfact,seq_prune,svdllm,depth")
    parser.add_argument("--recover-budgets", default="0.5")
    parser.add_argument("--recover-original", action="store_true",
                        help="also distil the uncompressed model the same way: how much is domain adaptation")
    parser.add_argument("--plot", type=Path, help="write the perplexity-vs-parameters plot here (PNG)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--resume", type=Path, help="a JSON-lines log of an earlier run (this script's stdout): "
                        "its rows are kept and not run again")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="run nothing: the table of --resume's rows")
    parser.add_argument("--note", default="", help="a line under the command, e.g. how the resumed rows were run")
    args = parser.parse_args()

    tok = load_tokenizer(args.model)
    val = tokenize_file(DATA / "val.txt", tok)[:args.eval_tokens + 1]
    train_ids = tokenize_file(DATA / "train.txt", tok)
    batches = calibration_batches(train_ids, args.cal_windows, args.cal_len)
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    total = count_parameters(base)
    mlp = sum(p.numel() for t in select(base, peers.RULES) for p in t.module.parameters())
    budgets = [float(b) for b in args.budgets.split(",")]
    ratio_of = {b: (b if b <= 1 else 1 - (total - b) / mlp) for b in budgets}
    recovered = {float(b) for b in args.recover_budgets.split(",")} if args.recover_tokens else set()
    wanted, to_recover = args.methods.split(","), args.recover_methods.split(",")
    if args.recover_original and args.recover_tokens:
        recovered.add(None)
        to_recover.append("original")
    logged = [json.loads(line) for line in args.resume.read_text().splitlines() if line.startswith("{")] \
        if args.resume else []
    rows = list({(r["method"], r.get("budget")): r for r in logged}.values())  # the latest row of each

    def done(name: str, budget: float | None) -> bool:
        if args.render_only:
            return True
        need = budget in recovered and name in to_recover
        return any(r["method"] == name and r.get("budget") == budget and (not need or "recovered_ppl" in r)
                   for r in rows)

    def measure(name: str, budget: float | None, fn: Callable[[nn.Module], None] | None) -> None:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if fn is not None:
            fn(model)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, val, context=512, stride=512, batch_size=8)
        row = {"method": name, "budget": budget, "ratio": None if budget is None else ratio_of[budget],
               "params": count_parameters(model), "ppl": ppl, "seconds": seconds}
        if budget in recovered and name in to_recover:
            row["recover_seconds"] = recover(model, base, train_ids, args.recover_tokens)
            row["recover_tokens"] = args.recover_tokens
            row["recovered_ppl"] = perplexity(model, val, context=512, stride=512, batch_size=8)
        rows[:] = [r for r in rows if not (r["method"] == name and r.get("budget") == budget)] + [row]
        print(json.dumps(row), flush=True)

    stats_cache, fisher_cache = {}, {}
    names = [t.name for t in select(base, peers.RULES)]

    def stats(model):
        if not stats_cache:
            stats_cache.update(peers.input_stats(base, names, batches))
        return stats_cache

    def fisher(model):
        if not fisher_cache:
            fisher_cache.update(peers.row_fisher(copy.deepcopy(base), names, batches))
        return fisher_cache

    if "original" in wanted and not done("original", None):
        measure("original", None, None)
    for budget in budgets:
        target = total - (1 - ratio_of[budget]) * mlp
        for name, fn in methods(ratio_of[budget], target, batches, stats, fisher).items():
            if name in wanted and not done(name, budget):
                measure(name, budget, fn)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    original = next((r["ppl"] for r in rows if r["method"] == "original"), None)
    if args.plot and original:
        plot(rows, original, args.plot)
    text = render(rows, original, args, total, mlp)
    print(text)
    if not args.no_write:
        write_section("real_lm", text)


def render(rows: list[dict], original: float | None, args: argparse.Namespace, total: int, mlp: int) -> str:
    """The RESULTS.md section: one table, budgets from largest to smallest, methods in LABELS order."""
    rec = sorted({r["recover_tokens"] for r in rows if "recover_tokens" in r})
    lines = [f"`python benchmarks/real_lm.py --model SMOLLM2 --budgets {args.budgets} --eval-tokens {args.eval_tokens}"
             + (f" --recover-tokens {args.recover_tokens} --recover-methods {args.recover_methods}"
                f" --recover-budgets {args.recover_budgets}" if args.recover_tokens else "")
             + (" --recover-original" if args.recover_original else "")
             + (f" --plot {args.plot}" if args.plot else "") + f"` — {machine()}.", "",
             *([args.note, ""] if args.note else []),
             f"{args.model.name}: {total:,} parameters, MLPs {mlp:,}. Perplexity on the first {args.eval_tokens:,} "
             f"tokens of val.txt (context 512, token-weighted); calibration {args.cal_windows}×{args.cal_len} tokens "
             "of train.txt, seed 0. Seconds: compress wall time (2 cores)."
             + (f" Recovered: distilled from the original for {', '.join(f'{t:,}' for t in rec)} tokens of train.txt "
                "(see the script's docstring), the final weights." if rec else ""), "",
             "| budget | method | params (total) | perplexity | × original | seconds | recovered ppl | × original "
             "| recovery s |", "|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(LABELS)}

    def label(budget):
        return "—" if budget is None else f"MLP {budget:.0%}" if budget <= 1 else f"{budget / 1e6:.0f}M total"

    for r in sorted(rows, key=lambda r: (-(r.get("ratio") or 2), order[r["method"]])):
        rel = f"{r['ppl'] / original:.2f}" if original else ""
        after = (f"{r['recovered_ppl']:.2f} | {r['recovered_ppl'] / original:.2f} | {r['recover_seconds']:.0f}"
                 if "recovered_ppl" in r else " | | ")
        lines.append(f"| {label(r.get('budget'))} | {LABELS[r['method']]} | {r['params']:,} | {r['ppl']:.4g} | "
                     f"{rel} | {r['seconds']:.0f} | {after} |")
    if args.plot:
        lines += ["", f"![perplexity against parameters, one line per method]({args.plot.name})"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
