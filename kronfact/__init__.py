"""kronfact: compress neural networks by replacing linear layers with sums of Kronecker products.

    report = kronfact.compress(model, rules="mlp.*", budget=81e6)   # in place
    kronfact.save_pretrained(model, "out/")                        # transformers folder + kronfact.json
"""

from . import train
from .evaluate import LambadaResult, lambada, perplexity
from .io import load, merge, save
from .kron import FactorShape, KronFactors, decompose, factor_shapes, kron_spectrum
from .layer import KronLinear
from .permute import fold_permutations
from .pretrained import from_pretrained, save_pretrained
from .surgery import CompressionReport, compress
from .train import TrainConfig, TrainResult
from .version import __version__ as __version__

__all__ = [
    "CompressionReport", "FactorShape", "KronFactors", "KronLinear", "LambadaResult", "TrainConfig", "TrainResult",
    "compress", "decompose", "factor_shapes", "fold_permutations", "from_pretrained", "kron_spectrum", "lambada",
    "load", "merge", "perplexity", "save", "save_pretrained", "train",
]
