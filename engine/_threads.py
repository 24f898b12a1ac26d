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


def _threadpools() -> ThreadpoolController:
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller


def single_threaded_blas():
    """Context manager: BLAS and OpenMP pools (numpy's and faiss's) limited to one thread inside."""
    return _threadpools().limit(limits=1)


def blas_single(fn: F) -> F:
    """Decorator form of :func:`single_threaded_blas`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_threaded_blas():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def one_openmp_thread() -> None:
    """``ThreadPoolExecutor`` initializer for the query helper thread. OpenMP's thread count is a per-thread
    setting, so :func:`single_threaded_blas` on the calling thread does not reach a helper thread: faiss
    searches there ran with an OpenMP team whose spinning workers then slowed the calling thread's next stage
    (on 2 cores: a search's features stage took 20 ms instead of 16). OpenBLAS's setting is process-wide and
    stays with the caller's context."""
    _threadpools().limit(limits=1, user_api="openmp")  # kept for the thread's life (not restored)
