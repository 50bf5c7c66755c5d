"""Does a depth ramp of the kept fraction help kronfact's neuron pruning? (Tried; not adopted.)

Block i of n keeps (0.5 + δ·(2i/(n−1) − 1)) of its MLP neurons (rounded to 8; the total is the uniform
50%), pruned by :func:`kronfact.prune.prune_neurons` on the same 32×256 calibration tokens as
``real_lm.py``; perplexity on the same first 16,384 val tokens (context 512). δ < 0: early blocks denser.
Measured on the set the table reports, so it informs, it does not select.

    python benchmarks/real_lm_ramp.py --model /path/to/smollm2 --deltas 0.1,-0.1,-0.2,-0.3
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from kronfact.data import calibration_batches, load_tokenizer, tokenize_file
from kronfact.evaluate import perplexity
from kronfact.prune import MULTIPLE, neuron_groups, prune_neurons
from kronfact.rules import select

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--deltas", default="0.1,-0.1,-0.2,-0.3")
    args = parser.parse_args()
    import transformers

    tok = load_tokenizer(args.model)
    batches = calibration_batches(tokenize_file(DATA / "train.txt", tok), 32, 256)
    val = tokenize_file(DATA / "val.txt", tok)[:16385]
    base = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    for delta in [float(d) for d in args.deltas.split(",")]:
        model = copy.deepcopy(base)
        groups, _ = neuron_groups(select(model, ["mlp.*"]))
        n = len(groups)
        keep = [round((0.5 + delta * (2 * i / (n - 1) - 1)) * g.hidden / MULTIPLE) * MULTIPLE
                for i, g in enumerate(groups)]
        prune_neurons(model, groups, keep, batches, compensate=False, progress=False)
        print(f"δ {delta:+.2f}: neurons {keep[0]}…{keep[-1]} (total {sum(keep)}), "
              f"ppl {perplexity(model, val, context=512, stride=512, batch_size=8):.2f}", flush=True)


if __name__ == "__main__":
    main()
