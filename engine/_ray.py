"""Index on a Ray cluster (``attrib index SOURCE --out INDEX --engine ray``): the only module that imports ray.

The driver (this process) plans the units (``engine._cluster.plan_units``), starts or joins a Ray cluster,
creates ``--ray-workers`` actors that each load both encoders once (on a GPU with ``--gpus-per-worker``), runs
the bootstrap unit and commits it (the codebooks), then hands the other units out, at most two queued per
worker, and commits finished ones in plan order (``engine._cluster.Committer``). Source and index folder must
be on a filesystem every node sees at the same path.

Failures. Ray restarts a worker whose process or node died (``max_restarts``); tasks are not retried by Ray
(``max_task_retries=0``) but by the driver, which sends the unit to a live worker instead: a unit queued on a
dead worker whose restart cannot be placed (its node is gone and the others are busy) would otherwise wait for
ever. A unit that fails ``retries + 1`` times (an exception, or its worker dying each time) is committed as one
reject naming it and the last error, and the build goes on; when several units in a row fail that way, the
build stops instead (the cluster, not the data, is broken) and a rerun resumes it.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from ._build import (
    BuildSummary,
    _check_patch_grid,
    _confirm_plan,
    _drop_empty,
    _empty_message,
    _is_ours,
    _plan,
    finish_build,
    remove_staged,
)
from ._cluster import (
    ClusterSettings,
    Committer,
    JobSpec,
    Plan,
    clear_incoming,
    failed_marker,
    plan_units,
    recover_incoming,
    run_unit,
    valid_marker,
)
from ._errors import AttribError, EmptyCorpusError, SourceError
from ._ingest import open_source
from ._manifest import now_iso, read_manifest
from ._profiles import get_profile
from ._settings import IndexSettings
from ._writer import IndexWriter
from .files import remove, require_utf8_path
from .ui import progress_bar

INSTALL = "pip install 'attrib-engine[ray]'"
IN_FLIGHT_PER_WORKER = 2  # one unit running, one waiting in the worker's queue
FAILED_IN_A_ROW = 3  # units that failed on every attempt, one after the other, before the build stops
FAULTS_ENV = "ATTRIB_RAY_FAULTS"  # test hook: JSON {part name: action}, see Worker._inject
_LOCAL_OBJECT_STORE = 256 * 1024**2  # the units and markers are small: a Ray started here keeps its store small


def import_ray():
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise AttribError(f"--engine ray needs Ray, which is not installed here ({e}); install it with: "
                          f"{INSTALL}") from None
    return ray


# --------------------------------------------------------------------------------------------- the worker actor
class Worker:
    """A Ray actor: loads both encoders once, then runs units (``engine._cluster.run_unit``) one at a time."""

    def __init__(self, models: str, device: str | None, clip_weights: str | None, dino_weights: str | None,
                 faults: dict | None = None) -> None:
        from ._encoders import Encoders

        self.encoders = Encoders(models, device=device, clip_weights=clip_weights, dino_weights=dino_weights)
        self.faults = dict(faults or {})
        self._codebooks: dict[str, object] = {}

    def ready(self) -> dict:
        import socket

        return {"identity": self.encoders.identity, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.encoders.device)}

    def run(self, unit, spec: JobSpec) -> dict:
        self._inject(unit)
        cb = None
        if spec.codebooks is not None:
            from ._codebooks import Codebooks

            key = hashlib.sha256(json.dumps([spec.index_dir, spec.codebooks], sort_keys=True).encode()).hexdigest()
            cb = self._codebooks.get(key)
            if cb is None:
                self._codebooks.clear()
                cb = self._codebooks[key] = Codebooks.load(Path(spec.index_dir) / spec.codebooks["path"],
                                                           spec.codebooks)
        return run_unit(unit, spec, self.encoders, cb)

    def _inject(self, unit) -> None:
        """Test hook (``faults={part name: action}``, or ``$ATTRIB_RAY_FAULTS`` as JSON): "raise" fails the unit,
        "exit" kills this worker's process, "exit-once:PATH" kills it the first time only (PATH remembers it),
        "sleep:SECONDS" stalls the unit."""
        for part in unit.parts:
            action = self.faults.get(part.name)
            if action == "raise":
                raise RuntimeError(f"injected failure while encoding {part.name}")
            if isinstance(action, str) and action.startswith("sleep:"):
                time.sleep(float(action.split(":", 1)[1]))
            if action == "exit" or (isinstance(action, str) and action.startswith("exit-once:")
                                    and not os.path.exists(action.split(":", 1)[1])):
                if action != "exit":
                    Path(action.split(":", 1)[1]).write_text("died once\n")
                os._exit(3)


# --------------------------------------------------------------------------------------------- the cluster
def _first_line(e: BaseException) -> str:
    text = str(e).strip() or e.__class__.__name__
    return text.splitlines()[0][:500]


def _cause(ray, e: BaseException) -> str:
    """A one-line reason from a Ray error (the worker's own exception when there is one)."""
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and cause is not None:
        return f"{cause.__class__.__name__}: {_first_line(cause)}"
    if isinstance(e, ray.exceptions.RayActorError):
        err = getattr(e, "error_msg", "") or str(e)
        lines = [x.strip() for x in err.splitlines() if x.strip()]
        useful = [x for x in lines if "Error" in x and "Traceback" not in x]
        return "the worker died" + (f" ({useful[-1][:300]})" if useful else "")
    return f"{e.__class__.__name__}: {_first_line(e)}"


def _start(ray, cs: ClusterSettings) -> bool:
    """Start a Ray on this machine, or join ``cs.address``; False when this process already runs one."""
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        if cs.address is None:
            ray.init(address="local", num_cpus=cs.local_cpus or os.cpu_count() or 1, include_dashboard=False,
                     object_store_memory=_LOCAL_OBJECT_STORE, **quiet)
        else:
            ray.init(address=cs.address, **quiet)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
        where = "start Ray on this machine" if cs.address is None else f"connect to the Ray cluster at {cs.address}"
        hint = "" if cs.address is None else (" (is it running? `ray start --head` starts one; ray:// addresses "
                                              "need the Ray client: pip install 'ray[client]')")
        raise AttribError(f"cannot {where}: {_first_line(e)}{hint}") from None
    finally:
        _restore_sigterm(old_term)  # ray.init installs its own; the CLI's turns SIGTERM into a clean stop
    return True


def _restore_sigterm(handler) -> None:
    try:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
    except (ValueError, TypeError):  # not the main thread
        pass


def _resources(ray, cs: ClusterSettings) -> tuple[int, float]:
    """(CPUs, GPUs) per worker, checked against what the cluster has."""
    have = ray.cluster_resources()
    cpus, gpus = float(have.get("CPU", 0)), float(have.get("GPU", 0))
    per_cpu = cs.cpus_per_worker or (max(1, int(cpus) // cs.workers) if cs.address is None else 1)
    if per_cpu * cs.workers > cpus or cs.gpus_per_worker * cs.workers > gpus + 1e-9:
        raise AttribError(
            f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs; {cs.workers} workers x {per_cpu} CPUs"
            + (f" x {cs.gpus_per_worker:g} GPUs" if cs.gpus_per_worker else "")
            + " do not fit: lower --ray-workers, --cpus-per-worker or --gpus-per-worker, or add nodes")
    return per_cpu, cs.gpus_per_worker


class _Pool:
    """The worker actors and which of them are alive."""

    def __init__(self, ray, cs: ClusterSettings, cpus: int, gpus: float, args: tuple) -> None:
        self.ray = ray
        opts = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": -1, "max_task_retries": 0}
        cls = ray.remote(Worker)
        self.actors = [cls.options(**opts).remote(*args) for _ in range(cs.workers)]
        self.alive: set[int] = set()
        self.probes: dict = {}  # ready() call -> actor
        self.errors: dict[int, str] = {}  # actor -> why its last probe failed
        self.since_alive = time.monotonic()
        for a in range(len(self.actors)):
            self.probe(a)

    def probe(self, a: int) -> None:
        self.probes[self.actors[a].ready.remote()] = a

    def lost(self, a: int) -> None:
        if a in self.alive:
            self.alive.discard(a)
            if not self.alive:
                self.since_alive = time.monotonic()
            self.probe(a)

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


# --------------------------------------------------------------------------------------------- the build
def build_index_ray(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    models: str = "default",
    device: str | None = None,
    settings: IndexSettings | None = None,
    cluster: ClusterSettings | None = None,
    overwrite: bool = False,
    append: bool = False,
    progress: bool = True,
    clip_weights: str | None = None,
    dino_weights: str | None = None,
    faults: dict | None = None,
    calibrate=None,
) -> BuildSummary:
    """Index ``source`` into ``out`` on a Ray cluster: the same index as :func:`engine.build_index` (same records,
    ids and vectors; rows too, except that records rejected while reading leave gaps), with the encoding spread
    over ``cluster.workers`` worker actors. Killed at any moment, the same call resumes: committed units are
    skipped, finished ones are committed from their done markers, the rest is encoded again.

    Args:
        source, out, models, device, settings, overwrite, append, progress, clip_weights, dino_weights: as for
            :func:`engine.build_index` (``device`` and the weights paths are used on every worker).
        cluster: the cluster and its workers (:class:`ClusterSettings`; default: a Ray started on this
            machine with one worker).
        faults: test hook, see ``Worker._inject``.
        calibrate: as for :func:`engine.build_index`: self-calibration once the index is complete (on this
            machine, with the index's models loaded here).
    Returns:
        A :class:`BuildSummary` (``engine="ray"``; ``startup_seconds``: starting or joining Ray and loading the
        models on the workers; ``encode_seconds``: time inside the encoders, summed over the workers).
    Raises:
        AttribError: Ray is not installed (one line saying how to install it), the cluster cannot be reached or
            lacks the resources asked for, the units that train the codebooks failed, or several units in a row
            failed on every attempt; and every error of :func:`engine.build_index`.
    """
    t0 = time.perf_counter()
    ray = import_ray()
    cs = cluster or ClusterSettings()
    if faults is None and os.environ.get(FAULTS_ENV):
        faults = json.loads(os.environ[FAULTS_ENV])
    settings = settings or IndexSettings()
    grid = get_profile(models).dino_patch_grid
    if grid is not None:
        _check_patch_grid(settings, {"profile": models, "dino": {"patch_grid": [grid, grid]}})
    if overwrite and append:
        raise AttribError("--overwrite and --append exclude each other")
    out = Path(out).expanduser().absolute()
    require_utf8_path(out, "the index folder", AttribError)
    require_utf8_path(Path(source).expanduser().absolute(), "the source", SourceError)
    src = open_source(source, settings.max_bytes)
    src_info = {"path": str(Path(source).expanduser().absolute()), "kind": src.kind, "fingerprint": src.fingerprint,
                "records": src.count, "started": now_iso()}
    if device is not None and device.startswith("cuda") and not cs.gpus_per_worker:
        raise AttribError(f"--device {device} needs GPUs on the workers: give --gpus-per-worker (e.g. 1)")
    if device is None:
        device = "cuda" if cs.gpus_per_worker > 0 else "cpu"
    mode, folder = _plan(out, overwrite, append, src_info, settings)
    if mode in ("resume", "overwrite") and (folder / "manifest.json").exists():
        b = read_manifest(folder)["build"]
        if not b.get("complete") and b.get("engine") != "ray":
            if mode == "resume":
                raise AttribError(f"the unfinished build in {folder} was started with the local engine; finish it "
                                  f"with the same command without --engine ray, or pass --overwrite to start again")
            remove_staged(folder)  # an interrupted local --overwrite build beside the index: this one starts again
        elif b.get("complete") and mode == "overwrite":
            remove_staged(folder)  # stopped before its swap: the local engine finishes it, this one starts again
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Ray's driver prints cluster events ("(raylet) ... marked dead", "A worker died ...") to sys.stdout from its
    # own thread; stdout belongs to the caller (`attrib index --json`), so they go to stderr while Ray is ours.
    to_stderr = contextlib.ExitStack()
    to_stderr.enter_context(contextlib.redirect_stdout(sys.stderr))
    try:
        started = _start(ray, cs)
    except BaseException:
        to_stderr.close()
        raise
    pool = writer = None
    try:
        cpus, gpus = _resources(ray, cs)
        pool = _Pool(ray, cs, cpus, gpus, (models, device, clip_weights, dino_weights, faults))
        identity = _wait_first_worker(ray, pool, cs)
        startup_s = time.perf_counter() - t0
        _check_patch_grid(settings, identity)
        recover_incoming(folder)
        writer = IndexWriter(folder, identity, settings, src.extra_columns, expected_images=src.count or 0,
                             source=src_info)
        _confirm_plan(out, mode, writer, overwrite, append, src_info, engine="ray")
        m = writer.manifest
        resuming = m is not None and not m["build"].get("complete")
        if m is None:
            base_row, base_seg, bootstrap = 0, 1, True
        elif resuming:
            r = m["build"].get("ray") or {}
            # its units were planned with the chunk it started with (recorded with its plan; before that, a build's
            # and an append's plan used the index's stored chunk): the run's own --chunk cannot apply
            writer.settings = dataclasses.replace(writer.settings, chunk=int(r.get("chunk") or m["settings"]["chunk"]))
            base_row, base_seg, bootstrap = int(r["base_row"]), int(r["base_segment"]), bool(r["bootstrap"])
            src_info = m["build"].get("source") or src_info
        else:
            base_row, base_seg, bootstrap = writer.next_row, int(m["next_segment"]), False
        plan = plan_units(src, writer.settings.chunk, base_row, base_seg, bootstrap)
        rejects_start = writer.committed_rejects_bytes if mode == "append" else 0  # before this run commits
        committer = Committer.resume(writer, plan, src_info) if resuming else Committer(writer, plan, src_info)
        encoded, encode_s = _drive(ray, pool, cs, writer, plan, committer, identity, src, progress)
        total_records = int(writer.manifest["counts"]["records"]) if writer.manifest else 0
        if (total_records == 0 and mode != "append") or (committer.added == 0 and mode == "append"):
            message = _empty_message(src, folder, rejects_start)
            if mode == "append":
                writer.finalize(progress=committer.progress())
                raise EmptyCorpusError(message + " (the index keeps its records; the rejects are in rejects.jsonl)")
            writer.abort()
            if _is_ours(folder):
                remove(folder)
            raise EmptyCorpusError(message)
        manifest = writer.finalize(progress=committer.progress())
    except BaseException:
        if writer is not None:
            writer.abort()
            if writer.manifest is None:  # nothing was ever committed: leave no folder that looks like an index
                _drop_empty(folder)
        raise
    finally:
        try:
            if pool is not None:
                pool.close()
            if started:
                _shutdown(ray)  # flushes Ray's last buffered messages (still to stderr)
        finally:
            to_stderr.close()
    clear_incoming(folder)
    # compaction, swap-in, summary and calibration as after a local build (models loaded here to calibrate)
    return finish_build(out, folder, mode, manifest, src, t0, encode_s, encoded, committer.added, calibrate, None,
                        progress, first_row=base_row, engine="ray", startup_seconds=startup_s)


def _shutdown(ray) -> None:
    """Stop the Ray this build started (the SIGTERM handler stays the caller's)."""
    old = signal.getsignal(signal.SIGTERM)
    try:
        ray.shutdown()
    finally:
        _restore_sigterm(old)


def _wait_first_worker(ray, pool: _Pool, cs: ClusterSettings) -> dict:
    """The models' identity, from the first worker that has loaded them."""
    deadline = time.monotonic() + cs.wait_seconds
    while time.monotonic() < deadline:
        identity = _poll_probes(ray, pool, None, timeout=0.5)
        if identity is not None:
            return identity
        if not pool.probes:
            why = "; ".join(sorted(set(pool.errors.values()))) or "unknown"
            raise AttribError(f"no Ray worker could start: {why}")
    raise AttribError(f"no Ray worker started within {cs.wait_seconds:g} s (the cluster may lack free CPUs/GPUs, "
                      f"or its nodes cannot import attrib-engine: install it on every node)")


def _poll_probes(ray, pool: _Pool, identity: dict | None, timeout: float) -> dict | None:
    """Collect finished ready() calls: a worker whose models match joins the pool. Returns the identity."""
    if not pool.probes:
        return identity
    done, _ = ray.wait(list(pool.probes), num_returns=len(pool.probes), timeout=timeout)
    for ref in done:
        a = pool.probes.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the actor's constructor raised (e.g. no weights there)
            cause = getattr(e, "cause", None)
            if isinstance(cause, AttribError) and identity is None and not pool.alive:
                raise cause.__class__(str(cause)) from None
            pool.errors[a] = _cause(ray, e)
            continue
        except ray.exceptions.RayActorError as e:
            pool.errors[a] = _cause(ray, e)
            pool.probe(a)  # restarting: ask again
            continue
        if identity is None:
            identity = info["identity"]
        elif info["identity"]["fingerprint"] != identity["fingerprint"]:
            raise AttribError(f"worker {info['host']} (pid {info['pid']}) loaded other model weights (fingerprint "
                              f"{info['identity']['fingerprint']}) than the first worker ({identity['fingerprint']}): "
                              f"give every node the same weights")
        pool.alive.add(a)
        pool.errors.pop(a, None)
    return identity


def _drive(ray, pool: _Pool, cs: ClusterSettings, writer: IndexWriter, plan: Plan, committer: Committer,
           identity: dict, src, progress: bool) -> tuple[int, float]:
    """Run and commit every unit of the plan not committed yet. Returns (images encoded, encoder seconds)."""
    d = _Driver(ray, pool, cs, writer, plan, committer, identity, src)
    total = sum(u.planned_items for u in plan.units[committer.committed:])
    with progress_bar(d.label(), total, enabled=progress, unit="img") as advance:
        for u in sorted(d.done):
            advance(sum(d.done[u]["items"]))
        d.advance = advance
        while committer.committed < len(plan.units):
            d.dispatch()
            _poll_probes(ray, pool, identity, timeout=0)
            if not pool.alive and time.monotonic() - pool.since_alive > cs.wait_seconds:
                why = "; ".join(sorted(set(pool.errors.values()))) or "no worker could be placed"
                raise AttribError(f"no Ray worker has been alive for {cs.wait_seconds:g} s ({why}); the committed "
                                  f"units are kept: rerun the same command to resume")
            d.collect()
            d.commit_ready()
    return d.encoded, d.encode_s


class _Driver:
    """The state of one run over the plan: which units are queued, running, finished or failed."""

    def __init__(self, ray, pool: _Pool, cs: ClusterSettings, writer: IndexWriter, plan: Plan,
                 committer: Committer, identity: dict, src) -> None:
        self.ray, self.pool, self.cs, self.writer, self.plan, self.committer = ray, pool, cs, writer, plan, committer
        self.units = plan.units
        self.src = src
        self.fp = identity["fingerprint"]
        folder = writer.folder
        self.done: dict[int, dict] = {}  # finished units waiting for their turn to be committed (plan order)
        for u in self.units[committer.committed:]:  # finished by an earlier run: committed without encoding
            mk = valid_marker(folder, u, plan.checksum, self.fp, deep=True)
            if mk is not None:
                self.done[u.index] = mk
        clear_incoming(folder, keep_units=set(self.done))
        self.todo = collections.deque(u.index for u in self.units[committer.committed:] if u.index not in self.done)
        self.attempts: collections.Counter[int] = collections.Counter()
        self.errors: dict[int, list[tuple[bool, str]]] = collections.defaultdict(list)  # (own exception, reason)
        self.failed_at: dict[int, float] = {}  # failed for good: committed once a later unit succeeds (or at the end)
        self.last_success = 0.0
        self.in_a_row = 0
        self.inflight: dict = {}  # ray ref -> (unit, actor)
        self.queues: dict[int, list] = collections.defaultdict(list)  # actor -> its refs, in submission order
        self.encoded, self.encode_s = 0, 0.0
        self.units_done = committer.committed + len(self.done)
        self.spec = self._spec() if not plan.bootstrap or committer.committed > 0 else None
        self.boot_spec = self._spec() if self.spec is None else None
        self.advance = lambda n, label=None: None

    def label(self) -> str:
        return f"indexing on ray ({self.units_done}/{len(self.units)} units)"

    def _spec(self) -> JobSpec:
        m = self.writer.manifest
        return JobSpec(str(self.writer.folder), self.plan.checksum, self.fp, self.writer.settings,
                       dict(self.writer.extra_schema), int(self.src.count or 0), m["codebooks"] if m else None)

    def dispatch(self) -> None:
        """Hand out queued units (the bootstrap alone until its codebooks are committed)."""
        for a in sorted(self.pool.alive):
            while len(self.queues[a]) < IN_FLIGHT_PER_WORKER and self.todo:
                if self.spec is None and self.todo[0] != 0:
                    return
                u = self.todo.popleft()
                ref = self.pool.actors[a].run.remote(self.units[u], self.spec or self.boot_spec)
                self.inflight[ref] = (u, a)
                self.queues[a].append(ref)

    def collect(self) -> None:
        """Wait a little for finished units and take their results."""
        ray = self.ray
        if not self.inflight:
            time.sleep(0.05 if self.done else 0.2)
            return
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
        if ready and len(self.inflight) > 1:
            ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        for ref in ready:
            if ref not in self.inflight:  # settled with its dead worker's other units
                continue
            u, a = self.inflight[ref]
            try:
                mk = ray.get(ref)
            except ray.exceptions.RayActorError:
                self._worker_died(a)
                continue
            except ray.exceptions.RayTaskError as e:
                self._forget(ref)
                self._failed(u, True, _cause(ray, e))
                continue
            self._forget(ref)
            self._finished(u, mk)

    def _forget(self, ref) -> None:
        u, a = self.inflight.pop(ref)
        self.queues[a].remove(ref)

    def _worker_died(self, a: int) -> None:
        """Settle every unit of a worker that died: only the one it was running (its oldest unfinished unit) is
        charged an attempt; the ones waiting behind it go back to the queue as they were."""
        ray = self.ray
        refs = list(self.queues[a])
        ray.wait(refs, num_returns=len(refs), timeout=5.0)
        charged = False
        for ref in refs:
            u, _ = self.inflight[ref]
            self._forget(ref)
            try:
                mk = ray.get(ref, timeout=0)
            except ray.exceptions.RayTaskError as e:
                self._failed(u, True, _cause(ray, e))
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                if not charged:
                    charged = True
                    self._failed(u, False, _cause(ray, e))
                else:
                    self.todo.appendleft(u)
                continue
            self._finished(u, mk)
        self.pool.lost(a)

    def _finished(self, u: int, mk: dict) -> None:
        self.done[u] = mk
        self.encoded += int(mk["encoded"])
        self.encode_s += float(mk["encode_seconds"])
        self.last_success = time.monotonic()
        self.in_a_row = 0
        self.units_done += 1
        self.advance(sum(mk["items"]), self.label())

    def _failed(self, u: int, own: bool, reason: str) -> None:
        """One failed attempt of unit ``u`` (``own``: its own exception, else its worker died running it)."""
        self.attempts[u] += 1
        self.errors[u].append((own, reason))
        unit = self.units[u]
        if self.attempts[u] <= self.cs.retries:
            self.todo.appendleft(u)
            return
        # the unit's own error says more than a lost worker
        reason = next((r for o, r in reversed(self.errors[u]) if o), reason)
        if unit.bootstrap:
            raise AttribError(f"the first units ({unit.name}), which train the codebooks, failed {self.attempts[u]} "
                              f"times; last error: {reason}")
        self.done[u] = failed_marker(unit, self.plan.checksum, self.attempts[u], reason)
        self.failed_at[u] = time.monotonic()
        self.in_a_row += 1
        self.units_done += 1
        self.advance(unit.planned_items, self.label())
        if self.in_a_row >= FAILED_IN_A_ROW:
            raise AttribError(f"{self.in_a_row} units in a row failed on every attempt (last: {unit.name}: {reason}); "
                              f"the committed units are kept: fix the cause, then rerun the same command to resume")

    def commit_ready(self) -> None:
        """Commit the finished prefix of the plan (a unit that failed for good waits until a later one works,
        so a broken cluster stops the build instead of rejecting every unit)."""
        c = self.committer
        n = len(self.units)
        idle = not self.todo and not self.inflight
        batch = []
        k = c.committed
        while k in self.done and (k not in self.failed_at or self.failed_at[k] < self.last_success or idle):
            batch.append(self.done[k])
            k += 1
        due = time.monotonic() - c.last >= self.cs.commit_seconds or k == n or idle or self.spec is None
        if batch and due:
            c.commit(batch)
            for mk in batch:
                self.done.pop(mk["unit"], None)
                self.failed_at.pop(mk["unit"], None)
            if self.spec is None:
                self.spec = self._spec()
        elif idle and not batch and c.committed < n and k not in self.done:
            raise AttribError(f"unit {k} of {n} was never finished; rerun the same command to resume")
