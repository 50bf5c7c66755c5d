"""Run a model block by block on calibration data: the sequential calibration of :mod:`kronfact.prune`.

A transformer is an embedding, a stack of blocks (an ``nn.ModuleList``: ``model.layers``,
``transformer.h``, ``encoder.layer`` …) and a head. :class:`BlockRunner` runs the model once per
calibration batch up to the first block, keeps that block's inputs (hidden states and every other
argument: masks, position embeddings), and from then on runs one block at a time, so a pass over
all blocks costs one forward of the stack — no embedding, no head, no re-running of earlier blocks.
Layer l is calibrated on the hidden states that the already-compressed blocks 0 … l−1 produce.

    runner = BlockRunner(model, ["model.layers.0.mlp.down_proj", ...], batches)
    for i, block in enumerate(runner.blocks):
        ...                     # capture inputs with hooks while runner.run(i) runs block i
        runner.advance(i)       # the stream moves past block i (with its current, compressed weights)

A model without such a stack (or whose selected layers are not all in one, or whose stack entries
are never called, e.g. a list of ModuleDicts) is one "block": the whole model, re-run on the
calibration batches for every step.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from .calibrate import as_call
from .errors import KronfactError


class _Stop(Exception):
    """Raised by the capture hook to end a forward at the first block."""


def block_stack(model: nn.Module, names: Sequence[str]) -> tuple[str, nn.ModuleList] | None:
    """The outermost ``nn.ModuleList`` (≥ 2 entries) holding every module in ``names``, or None.

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Embedding(5, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
    >>> block_stack(m, ["1.0", "1.2"])[0]
    '1'
    """
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 \
                and all(n.startswith(f"{prefix}.") for n in names):
            return prefix, module
    return None


def block_of(name: str, prefix: str) -> int:
    """The index of the block holding module ``name`` in the stack named ``prefix``."""
    return int(name[len(prefix) + 1:].split(".", 1)[0])


def _hidden(output: Any) -> Tensor:
    """A block's output hidden states: the tensor itself or the first entry of a tuple/list/ModelOutput."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    first = next(iter(output.values()), None) if isinstance(output, dict) else None
    if isinstance(first, Tensor):
        return first
    raise KronfactError(f"a block returned {type(output).__name__}; expected hidden states (a tensor or a tuple "
                        "starting with one)")


def calibration_mode(model: nn.Module) -> ExitStack:
    """A context in which ``model`` is in eval mode (each module's mode restored on exit), autograd off."""
    stack = ExitStack()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    stack.callback(lambda: [m.train(mode) for m, mode in modes.items()])
    stack.enter_context(torch.no_grad())
    return stack


class BlockRunner:
    """The calibration stream of a model: inputs of its blocks, advanced one block at a time.

    ``names``: the modules to be compressed (they decide which stack is used). ``batches`` are passed
    to the model as in :func:`kronfact.calibrate.collect_input_moments`. Use it inside
    :func:`calibration_mode`; the stream lives on the model's device.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], batches: Iterable[Any]):
        self.model = model
        found = block_stack(model, names)
        self.prefix, self.blocks = found if found is not None else ("", [model])
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.calls: list[tuple[tuple, dict]] = []
        for batch in batches:
            call = self._inputs(batch)
            if call is None and not self.calls:  # the stack is not called as blocks (e.g. a ModuleDict list)
                self.prefix, self.blocks = "", [model]
                call = self._inputs(batch)
            if call is None:
                raise KronfactError(f"a calibration batch never reached {self.prefix}.0; pass batches the "
                                    f"model runs on")
            self.calls.append(call)
        if not self.calls:
            raise KronfactError("calibration needs at least one batch")

    def block_of(self, name: str) -> int:
        """Index in :attr:`blocks` of the block holding module ``name``."""
        return block_of(name, self.prefix) if self.prefix else 0

    def _inputs(self, batch: Any) -> tuple[tuple, dict] | None:
        """One batch's (args, kwargs) for the first block (or the model, without a stack); None when the
        forward never called the first block."""
        args, kwargs, _ = as_call(batch, self.device)
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            kwargs.setdefault("use_cache", False)  # no KV cache in the captured arguments
        if not self.prefix:
            return args, kwargs
        seen: list[tuple[tuple, dict]] = []

        def catch(_module: nn.Module, b_args: tuple, b_kwargs: dict) -> None:
            seen.append((b_args, dict(b_kwargs)))
            raise _Stop

        with torch.no_grad(), ExitStack() as stack:
            stack.callback(self.blocks[0].register_forward_pre_hook(catch, with_kwargs=True).remove)
            try:
                self.model(*args, **kwargs)
            except _Stop:
                pass
        return seen[0] if seen else None

    def fork(self) -> BlockRunner:
        """A second stream at the same point (e.g. to follow the original model alongside)."""
        other = object.__new__(BlockRunner)
        other.__dict__.update(self.__dict__)
        other.calls = list(self.calls)
        return other

    def run(self, index: int) -> list[Tensor | None]:
        """Run block ``index`` on every batch's current inputs; its hidden-state outputs (None without a stack)."""
        block = self.blocks[index]
        outs = []
        with torch.no_grad():
            for args, kwargs in self.calls:
                out = block(*args, **kwargs)
                outs.append(_hidden(out) if self.prefix else None)
        return outs

    def advance(self, index: int, outputs: list[Tensor | None] | None = None) -> None:
        """Move the stream past block ``index``: its inputs become ``outputs`` (run now when not given)."""
        if not self.prefix or index == len(self.blocks) - 1:
            return
        outputs = self.run(index) if outputs is None else outputs
        calls = []
        for (args, kwargs), hidden in zip(self.calls, outputs, strict=True):
            if args:
                calls.append(((hidden, *args[1:]), kwargs))
            else:
                calls.append(((), {**kwargs, "hidden_states": hidden}))
        self.calls = calls

