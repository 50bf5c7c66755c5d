"""CPU threads for the decompositions: one owner of how LAPACK-heavy work uses the cores.

MKL's threaded LAPACK waits at barriers: when another process holds a core, two threads run one
eigensolver up to 100× slower than one (measured on 2 cores: eigvalsh of a 576×576 matrix, 19 ms on
one thread, 2.8 s on two with a busy core). So a single decomposition runs on one intra-op thread
(:func:`lapack`), and many independent ones run side by side instead (:func:`parallel_map`): one
Python thread per intra-op thread, each on one core with no barrier between them, so they scale on a
quiet machine and merely share the cores on a busy one.

>>> import torch
>>> before = torch.get_num_threads()
>>> list(parallel_map(abs, [-1, 2, -3])), torch.get_num_threads() == before
([1, 2, 3], True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")
R = TypeVar("R")

# torch's intra-op threads during one LAPACK call on the CPU (SVD, eigensolvers, QR); the GEMMs
# around the calls keep torch's threads.
LAPACK_THREADS = 1


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    threads = torch.get_num_threads()
    if threads <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def lapack(fn: Callable[..., Any], x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """``fn(x, …)`` — a torch.linalg decomposition — with ``LAPACK_THREADS`` intra-op threads on the CPU."""
    if x.device.type != "cpu":
        return fn(x, *args, **kwargs)
    with _intra_op_threads(LAPACK_THREADS):
        return fn(x, *args, **kwargs)


def parallel_map(fn: Callable[[T], R], items: Iterable[T], parallel: bool = True) -> Iterator[R]:
    """``fn`` of every item, yielded in order, computed by up to ``torch.get_num_threads()`` Python
    threads that each run one intra-op thread (torch releases the GIL in its kernels). ``parallel=False``,
    a single thread or a single item: a plain loop. The thread count is restored when the iterator is
    exhausted or closed; the first exception of ``fn`` is raised in order, and pending items are dropped.

    ``fn`` must not draw from torch's global random generator (the draws' order would vary) and
    should be CPU-bound work: on a GPU, run the loop (``parallel=False``)."""
    items = list(items)
    workers = min(torch.get_num_threads(), len(items)) if parallel else 1
    if workers <= 1:
        yield from map(fn, items)
        return
    with _intra_op_threads(1):
        pool = ThreadPoolExecutor(workers, thread_name_prefix="kronfact")
        try:
            yield from pool.map(fn, items)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
