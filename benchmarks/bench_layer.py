"""KronLinear speed against nn.Linear and materialise-per-call, and decompose speed.

    python benchmarks/bench_layer.py            # both allocator settings, writes RESULTS.md
    python benchmarks/bench_layer.py --quick    # fewer repetitions, no RESULTS.md

Layers: GPT-2's MLP matrices under the Krony-PT configs (given in GPT-2's Conv1D orientation for
c_fc 768×3072, c_proj mirrored; transposed here to nn.Linear's) plus a Llama-size up-projection,
4096 tokens, fp32. Every variant of one layer is timed round-robin in the same process (median of
the repetitions), so ratios compare like with like even if the machine's load drifts.

"Materialise-per-call" is how Krony-PT's code runs: Σ_i torch.kron(A_i, B_i) in every forward,
then a dense GEMM. The FLOP-ideal speedup is dense FLOPs / the cheaper Kronecker order's FLOPs.

glibc's malloc serves blocks above 32 MB by mmap, so each fresh large tensor pays page faults; the
script runs itself twice, with the default allocator and with MALLOC_MMAP_THRESHOLD_ raised
(what jemalloc/tcmalloc users get), and reports both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import machine, write_section  # noqa: E402

import kronfact  # noqa: E402
from kronfact.kron import rearrange  # noqa: E402
from kronfact.layer import KronLinear  # noqa: E402
from kronfact.plans import path_ops  # noqa: E402

TOKENS = 4096
# name: (out, in, shape_a, rank) in nn.Linear orientation.
# Krony-PT c_fc (Conv1D 768×3072) A p×q ⊗ B s×t becomes A q×p ⊗ B t×s; c_proj is mirrored.
LAYERS = {
    "67M c_fc": (3072, 768, (32, 128), 1),
    "67M c_proj": (768, 3072, (128, 32), 1),
    "80M c_fc": (3072, 768, (1024, 256), 2),
    "80M c_proj": (768, 3072, (256, 1024), 2),
    "81M c_fc": (3072, 768, (768, 768), 1),
    "81M c_proj": (768, 3072, (768, 768), 1),
    "92M c_fc": (3072, 768, (1024, 256), 4),
    "92M c_proj": (768, 3072, (256, 1024), 4),
    "95M c_fc": (3072, 768, (3072, 384), 1),
    "95M c_proj": (768, 3072, (384, 3072), 1),
    "Llama up 11008×4096": (11008, 4096, (86, 64), 8),
}
VARIANTS = ["nn.Linear", "materialise", "dense", "b_first", "a_first", "auto"]
TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}


def materialise_forward(x, a, b, bias):
    """Krony-PT's way: build W = Σ_i kron(A_i, B_i) on every call, then one GEMM."""
    w = sum(torch.kron(a[i], b[i]) for i in range(a.shape[0]))
    return F.linear(x, w, bias)


def call(module_fn, params, x, grad_out, train):
    """One timed call: a forward without autograd, or (``train``) a forward and a backward of ``grad_out`` with
    the gradients of ``params`` and ``x`` cleared first."""
    if not train:
        with torch.no_grad():
            return module_fn(x)
    for p in params:
        p.grad = None
    x.grad = None
    module_fn(x).backward(grad_out)


def make_fns(out_f, in_f, shape_a, rank, train):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f)
    layers = {p: KronLinear(in_f, out_f, shape_a, rank, path=p) for p in ("dense", "b_first", "a_first", "auto")}
    for layer in layers.values():
        layer.load_state_dict(layers["auto"].state_dict())
        layer.train(train)
    x = torch.randn(TOKENS, in_f, requires_grad=train)
    grad_out = torch.randn(TOKENS, out_f)  # a real upstream gradient (not .sum()'s expanded ones)

    def run(module_fn, params):
        return call(module_fn, params, x, grad_out, train)

    k = layers["auto"]
    fns = {"nn.Linear": lambda: run(linear, linear.parameters()),
           "materialise": lambda: run(lambda t: materialise_forward(t, k.a, k.b, k.bias), k.parameters())}
    for p, layer in layers.items():
        fns[p] = (lambda layer=layer: run(layer, layer.parameters()))
    return fns, layers["auto"].choose_path(TOKENS, cached=not train)


def time_round_robin(fns, reps):
    for f in fns.values():  # warm up
        f()
    samples = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            t = time.perf_counter()
            f()
            samples[n].append(time.perf_counter() - t)
    return {n: statistics.median(s) for n, s in samples.items()}


def flops(path, out_f, in_f, shape_a, rank):
    shape_b = (out_f // shape_a[0], in_f // shape_a[1])
    return sum(op.flops for op in path_ops(path, TOKENS, rank, shape_a, shape_b, cached=True))


def bench_layers(reps):
    rows = []
    for name, (out_f, in_f, shape_a, rank) in LAYERS.items():
        dense_flops = flops("dense", out_f, in_f, shape_a, rank)
        best_kron = min(flops(p, out_f, in_f, shape_a, rank) for p in ("b_first", "a_first"))
        for train in (False, True):
            fns, chosen = make_fns(out_f, in_f, shape_a, rank, train)
            t = time_round_robin(fns, max(2, reps // (4 if "Llama" in name else 1)))
            work = {"nn.Linear": dense_flops, "materialise": dense_flops, "dense": dense_flops,
                    "b_first": flops("b_first", out_f, in_f, shape_a, rank),
                    "a_first": flops("a_first", out_f, in_f, shape_a, rank)}
            work["auto"] = work[chosen]
            mult = 3 if train else 1
            rows.append({"layer": name, "mode": "fwd+bwd" if train else "fwd", "auto_path": chosen,
                         "ms": {n: 1e3 * v for n, v in t.items()},
                         "gflops": {n: mult * work[n] / t[n] / 1e9 for n in t},
                         "ideal": dense_flops / best_kron,
                         "auto_speedup": t["nn.Linear"] / t["auto"],
                         "vs_materialise": t["materialise"] / t["auto"]})
            print(f"  {name} {rows[-1]['mode']}: auto={chosen} {rows[-1]['auto_speedup']:.2f}x dense", flush=True)
    return rows


def _weights(out_f, in_f, shape_a, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(out_f, in_f, generator=g) / in_f**0.5
    # decaying Kronecker spectrum (σ_k ∝ 0.8^k over 24 terms) plus 5% noise
    m1, n1 = shape_a
    a = torch.randn(24, m1, n1, generator=g) * (0.8 ** torch.arange(24.0))[:, None, None]
    b = torch.randn(24, out_f // m1, in_f // n1, generator=g)
    w = kronfact.kron.kron_sum(a, b)
    return w + 0.05 * w.std() * torch.randn(out_f, in_f, generator=g)


def _lowrank_error(w, shape_a, rank):
    """Krony-PT's way: torch.svd_lowrank(R(W), q=rank, niter=10); relative error of the result."""
    r_mat = rearrange(w, shape_a)
    _, s, _ = torch.svd_lowrank(r_mat, q=rank, niter=10)
    total = float(r_mat.double().square().sum())
    return max(total - float(s.double().square().sum()), 0.0) ** 0.5 / total**0.5


def bench_decompose():
    configs = {"67M": 1, "80M": 2, "81M": 1, "92M": 4, "95M": 1}
    rows = []
    for kind in ("decaying", "gaussian"):
        for cfg, rank in configs.items():
            mats = [(LAYERS[f"{cfg} {part}"][2], _weights(*LAYERS[f"{cfg} {part}"][:2], LAYERS[f"{cfg} {part}"][2],
                                                          kind, seed))
                    for seed in range(12) for part in ("c_fc", "c_proj")]
            t = time.perf_counter()
            ours = [kronfact.decompose(w, sa, rank).rel_error for sa, w in mats]
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            theirs = [_lowrank_error(w, sa, rank) for sa, w in mats]
            t_theirs = time.perf_counter() - t
            rows.append({"what": f"{cfg}: 24 GPT-2 MLP matrices, rank {rank}", "weights": kind, "ours_s": t_ours,
                         "lowrank_s": t_theirs, "ours_err": statistics.mean(ours),
                         "lowrank_err": statistics.mean(theirs)})
        w = _weights(11008, 4096, (86, 64), kind, 0)
        t = time.perf_counter()
        err = kronfact.decompose(w, (86, 64), 8).rel_error
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        err2 = _lowrank_error(w, (86, 64), 8)
        rows.append({"what": "Llama 11008×4096, shape_a (86, 64), rank 8", "weights": kind, "ours_s": t_ours,
                     "lowrank_s": time.perf_counter() - t, "ours_err": err, "lowrank_err": err2})
    return rows


def layer_table(rows, title):
    table = Table(title=title)
    for col in ["layer", "mode", "auto path"] + [f"{v} ms" for v in VARIANTS] + [
            "auto GFLOP/s", "FLOP-ideal ×", "auto × vs dense", "auto × vs materialise"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["layer"], r["mode"], r["auto_path"], *(f"{r['ms'][v]:.1f}" for v in VARIANTS),
                      f"{r['gflops']['auto']:.0f}", f"{r['ideal']:.2f}", f"{r['auto_speedup']:.2f}",
                      f"{r['vs_materialise']:.2f}")
    return table


def markdown_layers(rows):
    head = ["layer", "mode", "auto path"] + [f"{v} ms" for v in VARIANTS] + [
        "dense GFLOP/s", "auto GFLOP/s", "FLOP-ideal ×", "auto × vs dense", "auto × vs materialise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["layer"], r["mode"], r["auto_path"]]
                                       + [f"{r['ms'][v]:.1f}" for v in VARIANTS]
                                       + [f"{r['gflops']['nn.Linear']:.0f}", f"{r['gflops']['auto']:.0f}",
                                          f"{r['ideal']:.2f}", f"**{r['auto_speedup']:.2f}**",
                                          f"{r['vs_materialise']:.2f}"]) + " |")
    return "\n".join(lines)


def markdown_decompose(rows):
    lines = ["| matrices | weights | kronfact s | svd_lowrank(niter=10) s | kronfact mean rel. error | "
             "svd_lowrank mean rel. error |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['weights']} | **{r['ours_s']:.3f}** | {r['lowrank_s']:.3f} | "
                     f"{r['ours_err']:.5f} | {r['lowrank_err']:.5f} |")
    return "\n".join(lines)


def run_child(tuned, reps):
    env = dict(os.environ, **(TUNED_ENV if tuned else {}))
    for k in TUNED_ENV if not tuned else ():
        env.pop(k, None)
    out = subprocess.run([sys.executable, __file__, "--child", "--reps", str(reps)], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repetitions, print only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rows = bench_layers(args.reps)
        print(json.dumps({"layers": rows, "decompose": bench_decompose()}))
        return
    reps = 3 if args.quick else args.reps
    console = Console()
    results = {}
    for tuned in (False, True):
        label = "MALLOC_MMAP_THRESHOLD_=1e9" if tuned else "default glibc malloc"
        console.print(f"[bold]Timing with {label}…")
        results[label] = run_child(tuned, reps)
        console.print(layer_table(results[label]["layers"], f"4096 tokens, fp32, {label}"))
    decomp = results["default glibc malloc"]["decompose"]
    console.print(markdown_decompose(decomp))
    if args.quick:
        return
    cmd = "python benchmarks/bench_layer.py"
    text = [f"## KronLinear and decompose speed\n\nCommand: `{cmd}` — {machine()}. {TOKENS} tokens, fp32, "
            f"median of {reps} round-robin repetitions per variant. Times in ms; speedups are nn.Linear time / "
            "auto time measured in the same run. FLOP-ideal = dense FLOPs / the cheaper Kronecker order's FLOPs."]
    for label, res in results.items():
        text.append(f"### Layers, {label}\n\n" + markdown_layers(res["layers"]))
    text.append("### decompose vs Krony-PT's `torch.svd_lowrank(R(W), q=rank, niter=10)` (default malloc)\n\n"
                "Weights: `decaying` = a Kronecker spectrum σ_k ∝ 0.8^k plus 5% noise (like trained layers); "
                "`gaussian` = i.i.d. noise, a flat spectrum, the worst case for randomized SVD.\n\n"
                + markdown_decompose(decomp))
    write_section("bench_layer", "\n\n".join(text))


if __name__ == "__main__":
    main()
