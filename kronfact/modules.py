"""What kronfact can replace, how to read its weight, and how to count a model's parameters."""

from __future__ import annotations

from torch import Tensor, nn

from .errors import KronfactError


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (GPT-2 family), detected without importing transformers.

    Conv1D computes x·W + b with W stored (in_features, out_features) = (nx, nf).
    """
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(module, "weight", None), Tensor) and hasattr(module, "nf"))


def is_eligible(module: nn.Module) -> bool:
    """Modules kronfact can replace: nn.Linear (and subclasses) and transformers' Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> Tensor:
    """The weight of an eligible module in nn.Linear orientation, (out_features, in_features).

    A view for Conv1D (its stored weight transposed), the weight itself for nn.Linear.
    """
    if is_conv1d(module):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise KronfactError(f"{type(module).__name__} is not an nn.Linear or transformers Conv1D")


def storage_key(p: Tensor) -> tuple[int, int]:
    """What identifies a tensor's memory: (storage address, offset); tied tensors share it."""
    return (p.untyped_storage().data_ptr(), p.storage_offset()) if p.device.type != "meta" else (id(p), 0)


def count_parameters(model: nn.Module) -> int:
    """Every parameter element of ``model``, each shared (tied) tensor counted once.

    Nothing is left out: position tables, norms, biases and embeddings all count.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        key = storage_key(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total
