"""bench_layer's layers, this checkout's KronLinear against an earlier commit's, in one process.

    python benchmarks/bench_layer_ab.py --baseline edbffb4     # writes RESULTS.md section bench_layer_ab

The baseline's ``kronfact`` package is extracted with ``git archive`` into a temporary folder and imported
as ``kronfact_baseline``, so both layers (same factors, same input) run round-robin in the same process, with
nn.Linear alongside: each ratio is a median of per-round ratios, robust to the machine's drift. Forward is
eval mode without autograd (inference), the training step a forward and backward with a real upstream
gradient. ``current / baseline`` above 1 means this checkout is faster; ``--control`` adds a second copy of the
baseline's layer, whose ratio to the first shows the measurement's noise.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer import LAYERS, TOKENS, call  # noqa: E402
from results import machine, write_section  # noqa: E402

from kronfact.layer import KronLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def baseline_layer_class(rev: str, folder: str):
    """KronLinear of ``rev``'s kronfact package, imported as ``kronfact_baseline`` from ``folder``. Its torch
    operators (``kronfact::…``, since 3f8335c) are renamed ``kronfact_baseline::…``: the current package has
    registered the same names already."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "kronfact"], check=True,
                          stdout=subprocess.PIPE).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        try:
            tar.extractall(folder, filter="data")
        except TypeError:  # Python < 3.10.12 has no filter; the archive is this repository's own
            tar.extractall(folder)
    for source in Path(folder, "kronfact").rglob("*.py"):
        text = source.read_text()
        for old, new in (('Library("kronfact"', 'Library("kronfact_baseline"'), ('"kronfact::', '"kronfact_baseline::'),
                         ("torch.ops.kronfact.", "torch.ops.kronfact_baseline.")):
            text = text.replace(old, new)
        source.write_text(text)
    spec = importlib.util.spec_from_file_location("kronfact_baseline", Path(folder, "kronfact", "__init__.py"),
                                                  submodule_search_locations=[str(Path(folder, "kronfact"))])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kronfact_baseline"] = module
    spec.loader.exec_module(module)
    return module.KronLinear


def timings(layers: dict, train: bool, in_f: int, out_f: int, reps: int) -> dict:
    """{name: [seconds per round]} for one call of each layer, round-robin, the order rotated every round."""
    x = torch.randn(TOKENS, in_f, requires_grad=train)
    grad_out = torch.randn(TOKENS, out_f)

    for layer in layers.values():  # warm up
        call(layer, layer.parameters(), x, grad_out, train)
    samples = {name: [] for name in layers}
    names = list(layers)
    for i in range(reps):
        for name in names[i % len(names):] + names[:i % len(names)]:  # each layer takes every place in turn
            layer = layers[name]
            start = time.perf_counter()
            call(layer, layer.parameters(), x, grad_out, train)
            samples[name].append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a commit (any git revision) of this repository")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--control", action="store_true", help="time a second copy of the baseline layer (noise)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline], check=True,
                         stdout=subprocess.PIPE, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                          stdout=subprocess.PIPE, text=True).stdout.strip()
    if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "kronfact"], check=True,
                      stdout=subprocess.PIPE, text=True).stdout.strip():
        head += " + uncommitted changes"
    columns = ["layer", "mode", "nn.Linear ms", "baseline ms", "current ms", "current / baseline"] + (
        ["baseline again / baseline"] if args.control else []) + ["baseline × nn.Linear", "current × nn.Linear"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    with tempfile.TemporaryDirectory() as folder:
        Baseline = baseline_layer_class(rev, folder)
        for name, (out_f, in_f, shape_a, rank) in LAYERS.items():
            for train in (False, True):
                torch.manual_seed(0)
                current = KronLinear(in_f, out_f, shape_a, rank).train(train)
                baseline = Baseline(in_f, out_f, shape_a, rank).train(train)
                baseline.load_state_dict(current.state_dict())
                layers = {"nn.Linear": torch.nn.Linear(in_f, out_f), "baseline": baseline, "current": current}
                if args.control:
                    layers["baseline again"] = copy.deepcopy(baseline)
                s = timings(layers, train, in_f, out_f, max(3, args.reps // (3 if "Llama" in name else 1)))
                med = {n: statistics.median(v) * 1e3 for n, v in s.items()}

                def ratio(num, den, s=s):
                    return statistics.median(a / b for a, b in zip(s[num], s[den], strict=True))
                row = [name, "fwd+bwd" if train else "fwd", f"{med['nn.Linear']:.1f}", f"{med['baseline']:.1f}",
                       f"{med['current']:.1f}", f"**{ratio('baseline', 'current'):.2f}**"] + (
                    [f"{ratio('baseline', 'baseline again'):.2f}"] if args.control else []) + [
                    f"{ratio('nn.Linear', 'baseline'):.2f}", f"{ratio('nn.Linear', 'current'):.2f}"]
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
    cmd = "python benchmarks/bench_layer_ab.py " + shlex.join(sys.argv[1:])
    text = (f"## KronLinear against an earlier commit: {head} vs {rev}\n\nCommand: `{cmd}` — {machine()}. "
            f"bench_layer's layers, {TOKENS} tokens, fp32, path \"auto\", default malloc; nn.Linear, {rev}'s layer "
            f"and {head}'s (same factors, same input) timed round-robin in one process, median of {args.reps} "
            "rounds (Llama: a third, at least 3), the order rotated every round; ratios are medians of per-round "
            "ratios. Forward: eval mode, no autograd. "
            "current / baseline > 1: this checkout is faster"
            + ("; \"baseline again\" is a second copy of the baseline's layer, timed alike: its ratio is the noise"
               if args.control else "") + ".\n\n" + "\n".join(lines))
    print(text)
    if not args.no_write:
        write_section("bench_layer_ab", text)


if __name__ == "__main__":
    main()
