"""Per MLP at equal parameters: prune neurons alone, or keep more neurons and make down_proj low rank?

For a few blocks of a gated-MLP LM (SmolLM2-135M), on the original model's calibration activations
H (32 windows of 256 tokens of Shakespeare train.txt, seed 0) and the block's down_proj D: the error
of the MLP output ‖H·Dᵀ − Ĥ·D̂ᵀ‖² / ‖H·Dᵀ‖² of
- kronfact's pruning: k = 768 neurons by group OBS, D refitted by least squares (the OBS path cost);
- k' > 768 neurons the same way, then the refitted D' truncated to the rank r that brings the MLP
  back to the same parameters, optimally in the whitened norm (SVD of D'·L, L Cholesky of H_SᵀH_S —
  SVD-LLM's truncation), so the error is the sum of both parts.

    python benchmarks/real_lm_structures.py --model /path/to/smollm2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

from kronfact.calibrate import damped  # noqa: E402
from kronfact.data import (  # noqa: E402
    calibration_batches,  # noqa: E402
    load_tokenizer,
    tokenize_file,
)
from kronfact.prune import DAMPING, obs_path, refit  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"


class _Stop(Exception):
    pass


def hidden_gram(model, block: int, batches) -> torch.Tensor:
    """HᵀH / tokens of down_proj's inputs in ``block`` (the forward stops right after it)."""
    acc = {"g": 0, "n": 0}
    mlp = model.model.layers[block].mlp

    def record(_m, args):
        h = args[0].reshape(-1, args[0].shape[-1]).double()
        acc["g"], acc["n"] = acc["g"] + h.T @ h, acc["n"] + len(h)
        raise _Stop

    handle = mlp.down_proj.register_forward_pre_hook(record)
    with torch.no_grad():
        for b in batches:
            try:
                model(b, use_cache=False)
            except _Stop:
                pass
    handle.remove()
    return acc["g"] / acc["n"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--blocks", default="3,15,27")
    parser.add_argument("--keep", type=int, default=768, help="neurons kept by pruning alone")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    batches = calibration_batches(tokenize_file(DATA / "train.txt", load_tokenizer(args.model)), 32, 256)
    lines = [f"`python benchmarks/real_lm_structures.py --model SMOLLM2 --blocks {args.blocks} --keep {args.keep}` — "
             f"{machine()}.", "", "Relative MLP-output error on calibration activations at equal MLP parameters "
             "(script docstring).", "",
             "| block | neurons kept | down_proj rank | pruning error | truncation error | MLP output error |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for block in [int(b) for b in args.blocks.split(",")]:
        gram = hidden_gram(model, block, batches)
        d = model.model.layers[block].mlp.down_proj.weight.detach().double()
        out, hidden = d.shape
        total = float((d @ gram @ d.T).trace())
        budget = 2 * args.keep * out + args.keep * out  # gate + up rows and down columns of `keep` neurons
        for k in [args.keep, args.keep + 32, args.keep + 96, args.keep + 160, args.keep + 256]:
            kept, path = obs_path(gram, d, k)
            w = refit(gram, gram @ d.T, kept, DAMPING)
            rank = min((budget - 2 * k * out) // (k + out), min(w.shape))
            if k == args.keep:
                trunc, rank_text = 0.0, "dense"
            else:
                s = torch.linalg.svdvals(w @ torch.linalg.cholesky(damped(gram[kept][:, kept], 1e-8)))
                trunc, rank_text = float((s[rank:] ** 2).sum()), str(rank)
            prune = path[-1][1]
            lines.append(f"| {block} | {k} | {rank_text} | {prune / total:.4f} | {trunc / total:.4f} | "
                         f"{(prune + trunc) / total:.4f} |")
            print(lines[-1], flush=True)
    if not args.no_write:
        write_section("real_lm_structures", "\n".join(lines))


if __name__ == "__main__":
    main()
