"""Whole models, original vs compressed: prefill, decode, training step, peak RSS, bytes on disk.

    python benchmarks/bench_model.py                                   # tiny-gpt2, full protocol, writes RESULTS.md
    python benchmarks/bench_model.py --model smollm2 --smollm2 /work/models/smollm2 --prefill 1x512 \\
        --new-tokens 32 --train 1x256 --compile-decode --control
    python benchmarks/bench_model.py --model gpt2 --modes compiled --compile-decode --metrics "decode b1,decode b8" \\
        --section bench_model_gpt2_compiled_decode      # some cells only, in a section of their own

Models: ``tiny`` (../shared/models/tiny-gpt2-shakespeare, context 256), ``smollm2`` (a SmolLM2-135M folder,
built by ../shared/tools/smollm2.py), ``gpt2`` (GPT-2 124M shapes, random weights, seed 0). Structures at
50% and 25% of the MLP parameters (``mlp.*``):

- ``low rank``: the budget solver restricted to plain low rank, A (out, 1) ⊗ B (1, in);
- ``balanced``: the solver restricted to the most balanced candidate shape (A ≈ √(out·in) entries);
- ``Krony-PT``: rank 1 with Krony-PT's shapes — 95M's B 1×2 / 2×1 at 50%, 81M's B 4×1 / 1×4 at 25%;
- ``neurons``: structured neuron pruning (``method="neurons"``, calibration on random token ids — the
  speed does not depend on which neurons are kept).

Per variant: prefill tokens/s (a forward of B×T tokens, logits of the last position only, as
``generate`` does), decode tokens/s (``generate`` with the KV cache, greedy, a 64-token prompt, batch
1 and 8), training-step tokens/s (forward, backward and an AdamW step, causal-LM loss), eager and
``torch.compile``; bytes on disk (``kronfact.save_pretrained``) and peak RSS of a fresh process that
loads the saved folder and runs one prefill and one batch-1 decode. All variants of one model are timed
round-robin, median of ``--reps``; a ratio is the median over rounds of the variant's tokens/s over the
original's in the same round. The original is timed as a deep copy, as every variant is one (a model
fresh from ``from_pretrained`` keeps its weights in a mapping of the file). Compiled decode is
``generate`` with a static KV cache and the forward compiled by transformers (``CompileConfig``, as it
does on GPUs). ``--control`` adds a second copy of the original, timed like a variant: its ratios show
the measurement's noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

import kronfact  # noqa: E402
from kronfact.budget import candidate_shapes  # noqa: E402
from kronfact.modules import count_parameters, linear_weight  # noqa: E402
from kronfact.rules import select  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "models" / "tiny-gpt2-shakespeare"
RATIOS = (0.5, 0.25)
STRUCTURES = ("low rank", "balanced", "Krony-PT", "neurons")
PROMPT = 64
METRICS = ("prefill", "train", "decode b1", "decode b8")  # decode: eager always, compiled with --compile-decode


def load(name: str, smollm2: str | None) -> torch.nn.Module:
    if name == "tiny":
        model = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    elif name == "smollm2":
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    return model.eval()


def _rules(model: torch.nn.Module, shape_of) -> dict:
    """Per MLP layer name suffix (c_fc, gate_proj, …): {"shape_a": shape_of(out, in)}."""
    rules = {}
    for target in select(model, "mlp.*"):
        out_f, in_f = linear_weight(target.module).shape
        rules[".".join(target.name.split(".")[-2:])] = {"shape_a": shape_of(out_f, in_f)}
    return rules


def _krony(ratio: float):
    """Krony-PT's rank-1 shapes: B 1×2 (wide layers) / 2×1 at 50% (95M), B 4×1 / 1×4 at 25% (81M)."""
    k = round(1 / ratio)

    def shape_of(out_f: int, in_f: int) -> tuple[int, int]:
        return (out_f // k, in_f) if out_f > in_f else (out_f, in_f // k)
    return shape_of


def compressed(model: torch.nn.Module, structure: str, ratio: float, vocab: int) -> torch.nn.Module:
    model = copy.deepcopy(model)
    kw = {"progress": False, "method": "kron"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if structure == "low rank":
            kronfact.compress(model, _rules(model, lambda o, i: (o, 1)), ratio=ratio, **kw)
        elif structure == "balanced":
            kronfact.compress(model, _rules(model, lambda o, i: candidate_shapes(o, i)[1]), ratio=ratio, **kw)
        elif structure == "Krony-PT":
            rules = {k: {**v, "rank": 1} for k, v in _rules(model, _krony(ratio)).items()}
            kronfact.compress(model, rules, **kw)
        else:
            g = torch.Generator().manual_seed(0)
            batches = [torch.randint(0, vocab, (8, 256), generator=g) for _ in range(2)]
            kronfact.compress(model, "mlp.*", ratio=ratio, method="neurons", calibration=batches, progress=False)
    return model.eval()


def _ids(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _compile_config() -> transformers.CompileConfig:
    config = transformers.CompileConfig(fullgraph=False)
    config._compile_all_devices = True  # generate() compiles on CPU too (it would only on accelerators)
    return config


def measurements(model, compiled: bool, args, vocab: int) -> dict:
    """name → (tokens per call, a function running one call)."""
    (pb, pt), (tb, tt) = args.prefill, args.train
    fwd = torch.compile(model) if compiled else model
    prefill_ids = _ids(pb, pt, vocab)
    train_ids = _ids(tb, tt, vocab, seed=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def prefill():
        with torch.no_grad():
            fwd(prefill_ids, logits_to_keep=1)

    # compiled decode as transformers does it on a GPU: a static KV cache and the forward compiled by generate()
    static = {"cache_implementation": "static", "compile_config": _compile_config()} if compiled else {}

    def decode(batch):
        ids = _ids(batch, PROMPT, vocab, seed=3)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **static)

    def train_step():
        model.train()
        loss = fwd(train_ids, labels=train_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()

    out = {"prefill": (pb * pt, prefill), "train": (tb * tt, train_step)}
    if not compiled or args.compile_decode:
        out["decode b1"] = (args.new_tokens, lambda: decode(1))
        out["decode b8"] = (8 * args.new_tokens, lambda: decode(8))
    return {name: run for name, run in out.items() if args.metrics is None or name in args.metrics}


def rss_child(folder: str, args) -> None:
    """In a fresh process: load ``folder``, one prefill and one batch-1 decode; print peak RSS in bytes."""
    torch.set_num_threads(args.threads)
    model = kronfact.from_pretrained(folder).eval()
    vocab = model.config.vocab_size
    (pb, pt) = args.prefill
    with torch.no_grad():
        model(_ids(pb, pt, vocab), logits_to_keep=1)
        ids = _ids(1, PROMPT, vocab, seed=3)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    # VmHWM, this process's own peak: ru_maxrss survives fork + exec, so a child would report its parent's
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"rss": int(hwm.split()[1]) * 1024}))


def disk_and_rss(model, args) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "m")
        kronfact.save_pretrained(model, folder)
        disk = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
        out = subprocess.run([sys.executable, __file__, "--rss-child", folder, "--threads", str(args.threads),
                              "--prefill", "x".join(map(str, args.prefill))],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
    return disk, json.loads(out.strip().splitlines()[-1])["rss"]


def time_round_robin(variants: dict, mode: str, args, vocab: int) -> dict:
    """{variant: {metric: (tokens/s, ratio)}} — every metric timed round-robin over the variants: tokens/s is the
    median over rounds, the ratio the median of each round's tokens/s over the original's in that round (which
    cancels the machine's drift between rounds)."""
    fns = {name: measurements(m, mode == "compiled", args, vocab) for name, m in variants.items()}
    results = {name: {} for name in variants}
    for metric in next(iter(fns.values())):
        for name in variants:  # warm up (and compile)
            fns[name][metric][1]()
        samples = {name: [] for name in variants}
        for _ in range(args.reps):
            for name in variants:
                tokens, fn = fns[name][metric]
                start = time.perf_counter()
                fn()
                samples[name].append(tokens / (time.perf_counter() - start))
        base = samples["original"]
        for name in variants:
            ratio = statistics.median(v / b for v, b in zip(samples[name], base, strict=True))
            results[name][metric] = (statistics.median(samples[name]), ratio)
        print(f"  {mode} {metric}: " + ", ".join(f"{n} {results[n][metric][0]:.0f} ({results[n][metric][1]:.2f})"
                                                 for n in variants), flush=True)
    return results


def _pair(text: str) -> tuple[int, int]:
    b, t = text.lower().split("x")
    return int(b), int(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "smollm2", "gpt2"), default="tiny")
    parser.add_argument("--smollm2", default=None, help="SmolLM2-135M folder (../shared/tools/smollm2.py)")
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--prefill", type=_pair, default=(8, 512), help="B×T of the prefill (capped at the context)")
    parser.add_argument("--train", type=_pair, default=(8, 256), help="B×T of a training step")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--compile-decode", action="store_true",
                        help="also time generate() with a static cache and the forward compiled")
    parser.add_argument("--control", action="store_true", help="time a copy of the original as a variant (noise)")
    parser.add_argument("--metrics", type=lambda text: [m.strip() for m in text.split(",")], default=None,
                        help=f"only these, comma-separated, of {', '.join(METRICS)}")
    parser.add_argument("--section", default=None, help="RESULTS.md section (default bench_model_MODEL)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.metrics or ()) - set(METRICS)
    if unknown:
        parser.error(f"unknown --metrics {sorted(unknown)}: choose among {', '.join(METRICS)}")
    if "compiled" in args.modes and args.metrics and not args.compile_decode \
            and not set(METRICS[:2]) & set(args.metrics):
        parser.error("compiled decode is timed only with --compile-decode")
    torch.set_num_threads(args.threads)
    # every variant shares the model class's forward code: one compiled graph per variant and mode
    torch._dynamo.config.cache_size_limit = torch._dynamo.config.accumulated_cache_size_limit = 256
    if args.rss_child:
        return rss_child(args.rss_child, args)
    # timed as a deep copy, like every variant: from_pretrained leaves the weights in a private mapping of the file
    original = copy.deepcopy(load(args.model, args.smollm2))
    vocab, context = original.config.vocab_size, getattr(original.config, "n_positions", None) or \
        original.config.max_position_embeddings
    args.prefill = (args.prefill[0], min(args.prefill[1], context))
    args.train = (args.train[0], min(args.train[1], context))
    variants = {"original": original}
    if args.control:
        variants["original, again"] = copy.deepcopy(original)
    for ratio in map(float, args.ratios.split(",")):
        for structure in args.structures.split(","):
            start = time.perf_counter()
            variants[f"{structure} {ratio:.0%}"] = compressed(original, structure, ratio, vocab)
            print(f"built {structure} {ratio:.0%} in {time.perf_counter() - start:.1f} s", flush=True)
    info = {}
    for name, model in variants.items():
        kron = [m for m in model.modules() if isinstance(m, kronfact.KronLinear)]
        paths = sorted({m.choose_path(1, cached=True) + "/" + m.choose_path(args.prefill[0] * args.prefill[1],
                                                                            cached=True) for m in kron})
        disk, rss = disk_and_rss(model, args)
        info[name] = {"params": count_parameters(model), "disk": disk, "rss": rss, "paths": ", ".join(paths) or "—"}
        print(f"{name}: {info[name]}", flush=True)
    load_before = os.getloadavg()
    results = {mode: time_round_robin(variants, mode, args, vocab) for mode in args.modes.split(",")}
    load_after = os.getloadavg()
    text = report(args, info, results, load_before, load_after)
    print(text)
    if not args.no_write:
        write_section(args.section or f"bench_model_{args.model}", text)


def report(args, info, results, load_before, load_after) -> str:
    cmd = "python benchmarks/bench_model.py " + shlex.join(sys.argv[1:])
    metrics = list(next(iter(next(iter(results.values())).values())))
    head = ["variant", "params", "disk MB", "peak RSS MB", "path (1 token / prefill)"]
    for mode, res in results.items():
        head += [f"{mode} {m} tok/s (×)" for m in res["original"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, meta in info.items():
        row = [name, f"{meta['params'] / 1e6:.2f}M", f"{meta['disk'] / 1e6:.1f}", f"{meta['rss'] / 1e6:.0f}",
               meta["paths"]]
        for res in results.values():
            for m in res["original"]:
                v, ratio = res[name][m]
                row.append(f"{v:,.0f}" if name == "original" else f"{v:,.0f} (**{ratio:.2f}**)")
        lines.append("| " + " | ".join(row) + " |")
    (pb, pt), (tb, tt) = args.prefill, args.train
    only = f" ({', '.join(f'{mode} {m}' for mode, res in results.items() for m in res['original'])})" \
        if args.metrics else ""
    return (f"## Whole models: {args.model}, original vs compressed{only}\n\n"
            f"Command: `{cmd}` — {machine()}. Load average (1 min) {load_before[0]:.1f} before and "
            f"{load_after[0]:.1f} after the timing"
            + (f" (above this benchmark's own {args.threads}: other jobs shared the cores, so absolute figures are "
               "low and noisy)" if max(load_before[0], load_after[0]) > args.threads + 0.5 else "")
            + "; ratios: the median over rounds of each round's ratio to the original, timed as a deep copy like "
            "every variant (\"original, again\", if present, is a second copy: the measurement's noise). "
            f"Prefill {pb}×{pt} tokens (last-position logits), "
            f"decode {args.new_tokens} new tokens after a {PROMPT}-token prompt (generate, KV cache, greedy; "
            "compiled: a static cache and generate()'s own compiled forward), "
            f"training step {tb}×{tt} tokens (AdamW); "
            f"median of {args.reps} round-robin repetitions after a warm-up call; metrics: {', '.join(metrics)}. "
            "Peak RSS: a fresh process loading the saved folder and running one prefill and an 8-token decode.\n\n"
            + "\n".join(lines))


if __name__ == "__main__":
    main()
