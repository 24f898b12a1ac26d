"""The one thread that uses the index: a bounded queue, batches of queries, and every other index call.

An :class:`engine.Index` (its encoders, faiss and tantivy readers and its helper thread) is not safe for
concurrent use, so the server never touches it from its request threads. Requests put jobs on a bounded queue;
one worker thread takes a job, waits up to a short window for more to arrive, encodes the queries of the batch
together (``Index.encode_queries``: one forward pass per model for the whole batch) and then ranks each one
(``Index.search``) with its own k and fusion. Other jobs that need the index (a record lookup, the patch
correspondences of a report) run on the same thread, one at a time, between batches.

A job whose future was cancelled before it started (its request timed out) is skipped. ``close()`` lets every
job already queued finish, then stops the thread.
"""
from __future__ import annotations

import gc
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

_STOP = object()


class Busy(Exception):
    """The queue is full: the caller should answer 503 and let the client retry."""


@dataclass
class _Job:
    future: Future
    enqueued: float
    call: Callable[[], Any] | None = None  # a plain index call, or None for a query
    image: Any = None  # a decoded PIL image, or None
    prompt: str | None = None
    k: int = 10
    fusion: Any = None  # an engine.Fusion resolved at start-up
    query_id: str = "q"
    timings: dict = field(default_factory=dict)


@dataclass
class WorkerStats:
    """Counters since start (read by /v1/info and the tests)."""

    batches: int = 0  # query batches encoded
    queries: int = 0  # queries answered (errors included)
    largest_batch: int = 0  # the most queries seen in one batch
    calls: int = 0  # other index calls run
    skipped: int = 0  # jobs cancelled before they started (timed out)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class QueryWorker:
    """Runs every use of one :class:`engine.Index` on a single thread, batching queries.

    Args:
        index: the opened index (encoders already loaded).
        queue_size: jobs that may wait; :meth:`submit_query` raises :class:`Busy` beyond it.
        max_batch: queries encoded together at most.
        window_s: how long the worker waits for more queries after the first of a batch.
    """

    def __init__(self, index: Any, queue_size: int = 32, max_batch: int = 16, window_s: float = 0.005) -> None:
        self.index = index
        self.max_batch = max(1, int(max_batch))
        self.window_s = max(0.0, float(window_s))
        self._q: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self._thread = threading.Thread(target=self._run, name="attrib-serve-worker", daemon=True)
        self._closed = False
        self._lock = threading.Lock()
        self.stats = WorkerStats()

    # ------------------------------------------------------------------------------------------ public
    def start(self) -> "QueryWorker":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def pending(self) -> int:
        """Jobs waiting in the queue (not counting the batch running)."""
        return self._q.qsize()

    def submit_query(self, image: Any, prompt: str | None, k: int, fusion: Any, query_id: str = "q") -> Future:
        """Queue one query (a decoded PIL image and/or a prompt); the future gives an :class:`engine.Attribution`."""
        return self._put(_Job(Future(), time.perf_counter(), image=image, prompt=prompt, k=k, fusion=fusion,
                              query_id=query_id))

    def submit_call(self, fn: Callable[[], Any]) -> Future:
        """Queue a call that uses the index; the future gives its result."""
        return self._put(_Job(Future(), time.perf_counter(), call=fn))

    def close(self, timeout: float | None = None) -> None:
        """Finish every queued job, then stop the thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive():
            self._q.put(_STOP)  # blocks only while the queue is full; the worker keeps draining it
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------ internals
    def _put(self, job: _Job) -> Future:
        if self._closed:
            raise Busy("the server is shutting down")
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self._q.maxsize} requests are already waiting") from None
        return job.future

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is _STOP:
                return
            batch, stop = [job], False
            if job.call is None:  # a query: let others that arrive within the window join its batch
                deadline = time.perf_counter() + self.window_s
                while len(batch) < self.max_batch:
                    try:
                        nxt = self._q.get_nowait()  # already waiting: no wait at all
                    except queue.Empty:
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        try:
                            nxt = self._q.get(timeout=left)
                        except queue.Empty:
                            break
                    if nxt is _STOP:
                        stop = True
                        break
                    batch.append(nxt)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Job]) -> None:
        try:  # an append, a deletion or a rebuild committed since the last batch: answer from it from now on
            fresh = self.index.reopen_if_changed()
            if fresh is not self.index:
                self.index = fresh
                # the generation replaced holds its packed fast-scan lists in memory ((code + 8) B per image) and
                # sits in reference cycles: collect it now rather than whenever the cyclic collector runs (a
                # request still holding it keeps it alive)
                gc.collect()
        except Exception:  # noqa: BLE001 - a folder that cannot be read now: keep the generation already open
            pass
        queries = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                self.stats.skipped += 1
                continue
            if job.call is None:
                queries.append(job)
                continue
            self.stats.calls += 1
            try:
                job.future.set_result(job.call())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request, never lost
                job.future.set_exception(e)
        if queries:
            self._run_queries(queries)

    def _run_queries(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        self.stats.batches += 1
        self.stats.queries += len(jobs)
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        timings: dict[str, float] = {}
        try:
            encoded: list[Any] = self.index.encode_queries(
                [j.image for j in jobs], [j.prompt for j in jobs], [j.query_id for j in jobs], timings)
        except Exception:  # noqa: BLE001 - one bad query must not fail the others: encode them one by one
            encoded, timings = [], {}
            for j in jobs:
                try:
                    encoded.append(self.index.encode_queries([j.image], [j.prompt], [j.query_id], j.timings)[0])
                except Exception as e:  # noqa: BLE001 - handed to its own request
                    j.future.set_exception(e)
                    encoded.append(None)
        for j, q in zip(jobs, encoded):
            if q is None:
                continue
            t = dict(timings or j.timings)
            t["queue_wait"] = (started - j.enqueued) * 1e3
            try:
                j.future.set_result(self.index.search(q, j.k, fusion=j.fusion, timings=t))
            except Exception as e:  # noqa: BLE001 - handed to its own request
                j.future.set_exception(e)
