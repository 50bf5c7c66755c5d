"""How long ``kronfact.compress`` takes on a real checkpoint: the budget solver and fixed shapes and ranks.

    python benchmarks/bench_compress.py --smollm2 /work/models/smollm2          # writes RESULTS.md
    python benchmarks/bench_compress.py --smollm2 DIR --busy 1                  # with one core kept busy

Every MLP matrix (``mlp.*``) is replaced, no calibration data (Van Loan fits):

- ``budget solver``: ``compress(model, "mlp.*", ratio=r)`` — an error curve per matrix and candidate shape
  (plain low rank and up to five balanced Kronecker shapes), the knapsack, then one fit per matrix;
- ``fixed low rank``: every matrix A (out, 1) ⊗ B (1, in) at a rank given per rule;
- ``fixed Kronecker``: every matrix at its most balanced candidate shape and a rank given per rule.

Each row is the wall time of one call on a fresh copy of the model (the median of ``--reps``), with
torch's default threads for the machine's cores. ``--busy N`` keeps N other processes spinning on the
cores during the timing, the situation of a shared machine, to show compress does not collapse then.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

import kronfact  # noqa: E402
from kronfact.budget import candidate_shapes  # noqa: E402
from kronfact.modules import linear_weight  # noqa: E402
from kronfact.rules import select  # noqa: E402


def _spin() -> None:
    while True:
        pass


def _fixed(model: torch.nn.Module, balanced: bool, rank: int) -> dict:
    rules = {}
    for target in select(model, "mlp.*"):
        out_f, in_f = linear_weight(target.module).shape
        shape = candidate_shapes(out_f, in_f)[1] if balanced else (out_f, 1)
        rules[".".join(target.name.split(".")[-2:])] = {"shape_a": shape, "rank": rank}
    return rules


def timed(model: torch.nn.Module, kind: str, args) -> tuple[float, int]:
    """Seconds of one compress of a fresh copy, and the number of matrices it replaced."""
    fresh = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-calibration hint
        start = time.perf_counter()
        if kind == "budget solver":
            report = kronfact.compress(fresh, "mlp.*", ratio=args.ratio, progress=False)
        else:
            rules = _fixed(fresh, kind == "fixed Kronecker", args.kron_rank if kind == "fixed Kronecker"
                           else args.low_rank)
            report = kronfact.compress(fresh, rules, progress=False)
        seconds = time.perf_counter() - start
    return seconds, len(report.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", required=True, help="SmolLM2-135M folder (../shared/tools/smollm2.py)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--low-rank", type=int, default=128)
    parser.add_argument("--kron-rank", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="processes kept spinning during the timing")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    model = transformers.AutoModelForCausalLM.from_pretrained(args.smollm2, dtype=torch.float32).eval()
    load_before = os.getloadavg()[0]
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    rows = []
    try:
        for kind in ("budget solver", "fixed low rank", "fixed Kronecker"):
            runs = [timed(model, kind, args) for _ in range(args.reps)]
            seconds = [s for s, _ in runs]
            rows.append((kind, runs[0][1], statistics.median(seconds), min(seconds), max(seconds)))
            print(f"{kind}: {rows[-1][2]:.1f} s ({rows[-1][3]:.1f}–{rows[-1][4]:.1f})", flush=True)
    finally:
        for p in spinners:
            p.terminate()
    load_after = os.getloadavg()[0]

    what = {"budget solver": f"ratio={args.ratio}", "fixed low rank": f"A (out, 1), rank {args.low_rank}",
            "fixed Kronecker": f"most balanced candidate, rank {args.kron_rank}"}
    name = "compress_time" + ("_busy" if args.busy else "")
    cmd = "python benchmarks/bench_compress.py --smollm2 DIR" + (f" --busy {args.busy}" if args.busy else "")
    situation = (f"{args.busy} other process(es) spinning on the cores during the timing" if args.busy
                 else "nothing else was run on purpose")
    lines = [f"## compress time: SmolLM2-135M's MLP matrices{' with a busy core' if args.busy else ''}", "",
             f"`{cmd}` — {machine()}. Load average (1 min) {load_before:.1f} before and {load_after:.1f} after; "
             f"{situation}. No calibration (Van Loan fits). Median of {args.reps} calls, each on a fresh copy "
             "of the model; min–max in brackets.", "",
             "| compress | matrices | settings | seconds |", "|---|---|---|---|"]
    lines += [f"| {kind} | {n} | {what[kind]} | {med:.1f} ({lo:.1f}–{hi:.1f}) |" for kind, n, med, lo, hi in rows]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if not args.no_write:
        write_section(name, markdown)


if __name__ == "__main__":
    main()
