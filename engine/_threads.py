"""Keep numpy's and faiss's thread pools (OpenBLAS, OpenMP) single-threaded around the small products and
searches of querying and writing. Their worker threads spin after each call and, on a machine with few
cores, steal the cores that the next torch forward pass needs (measured on 2 cores: a CLIP image forward
went from 95 ms to 166 ms right after a numpy matmul). The work here is small, so one thread loses nothing,
and for single-query faiss IVF searches one thread is even faster (2.1 ms against 3.8 ms at 100k vectors)."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

from threadpoolctl import ThreadpoolController

F = TypeVar("F", bound=Callable)
_controller: ThreadpoolController | None = None


def single_threaded_blas():
    """Context manager: BLAS and OpenMP pools (numpy's and faiss's) limited to one thread inside."""
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=1)


def blas_single(fn: F) -> F:
    """Decorator form of :func:`single_threaded_blas`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_threaded_blas():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
