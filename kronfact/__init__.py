"""kronfact: compress neural networks by replacing linear layers with sums of Kronecker products."""

from .kron import FactorShape, KronFactors, decompose, factor_shapes, kron_spectrum
from .layer import KronLinear

__all__ = ["FactorShape", "KronFactors", "KronLinear", "decompose", "factor_shapes", "kron_spectrum"]
__version__ = "0.1.0"
