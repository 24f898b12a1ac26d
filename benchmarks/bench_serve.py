"""`attrib serve` under load: throughput and latency at 1, 4 and 8 concurrent clients against the in-process
library's sequential `Index.query` (the baseline, measured in the same run), memory over 1,000 requests, and a
burst beyond the queue.

Usage: python benchmarks/bench_serve.py [--images 300] [--models offline] [--seconds 20] [--clients 1,4,8]

It builds an index of generated scenes itself through the library (cached under $ATTRIB_CACHE/bench-serve),
makes 32 "generated" queries (a crop of a training scene, re-encoded as JPEG, with its caption as the prompt),
then in one run:
(a) warms up the in-process index and starts `attrib serve` on a free loopback port, then warms it up too
    (--warmup seconds each, not counted: a process's first ~20 queries are several times slower);
(b) for each N of --clients, --rounds rounds of two slices of --seconds each: the baseline, sequential
    `Index.query(image, prompt, k=10)` in this process, then N closed-loop clients against the server (one
    keep-alive connection each). Interleaving puts both under the same load: other jobs on a shared machine make
    the speed drift by several times within minutes. Reported per N: requests/s against the baseline's
    queries/s of the same rounds, p50/p95/p99 latency, errors. The baseline runs on a helper thread, as the
    server's queries run on its worker thread: on a loaded 2-core machine torch's 2-thread OpenMP team is much
    slower when called from the main thread, which would flatter the server;
(c) the server's RSS at start, after 100 and after 1,000 requests (more requests are sent if the phases made fewer);
(d) a burst of 3 x --queue simultaneous requests: some must get 503 with Retry-After, none may fail otherwise,
    and a normal request right after must be answered;
(e) SIGTERM: the server must exit 0.
Targets: 0 errors at every concurrency; at 8 clients >= 0.9 x the baseline's queries/s; p99 <= 3 x p50; RSS after
1,000 requests within 10% of RSS after 100. Saves benchmarks/results/bench_serve.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import pct, save, table

QUERIES = 32


def build_world(root: Path, n: int, models: str) -> tuple[Path, list[tuple[bytes, str, str]]]:
    """The index (built once, cached) and the queries: (JPEG bytes, prompt, expected source id)."""
    from PIL import Image

    import engine
    from engine.scenes import caption_of, random_scene, render, seeded_rng

    src, out = root / "src", root / "index"
    if not (out / "manifest.json").exists():
        src.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = seeded_rng(11, i)
            spec = random_scene(rng)
            render(spec, 224).save(src / f"scene{i:04d}.png")
            (src / f"scene{i:04d}.txt").write_text(caption_of(spec, rng) + "\n", encoding="utf-8")
        print(f"building a {n}-image index with the '{models}' profile (once; cached in {root}) ...", flush=True)
        engine.build_index(src, out, models=models, progress=False, overwrite=True, calibrate=False)
    queries = []
    for j in range(QUERIES):
        i = (j * 7919) % n
        im = Image.open(src / f"scene{i:04d}.png").convert("RGB")
        w, h = im.size
        im = im.crop((w // 20, h // 20, w - w // 20, h - h // 20)).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        queries.append((buf.getvalue(), (src / f"scene{i:04d}.txt").read_text(encoding="utf-8").strip(),
                        f"scene{i:04d}.png"))
    return out, queries


def baseline(index, files: list[tuple[Path, str, str]], seconds: float, thread: bool = True) -> dict:
    """Sequential in-process Index.query for ``seconds`` (after 3 warm-up queries), on a helper thread like the
    server's worker (``thread=False``: on the main thread)."""
    if thread:
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(baseline(index, files, seconds, thread=False)))
        t.start()
        t.join()
        return {**out, "thread": "helper"}
    for p, prompt, _ in files[:3]:
        index.query(image=str(p), prompt=prompt, k=10)
    lat, hits, t0, i = [], 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        p, prompt, want = files[i % len(files)]
        t = time.perf_counter()
        res = index.query(image=str(p), prompt=prompt, k=10)
        lat.append((time.perf_counter() - t) * 1e3)
        hits += res.results[0].id == want
        i += 1
    wall = time.perf_counter() - t0
    return {"thread": "main", "queries": len(lat), "seconds": round(wall, 2), "qps": round(len(lat) / wall, 3),
            "p50_ms": round(pct(lat, 50), 1), "p95_ms": round(pct(lat, 95), 1), "top1": round(hits / len(lat), 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def summary(clients: int, wall: float, lat: list[float], errors: list[str]) -> dict:
    out = {"clients": clients, "seconds": round(wall, 2), "requests": len(lat), "errors": len(errors),
           "error_kinds": sorted(set(errors))[:5], "rps": round(len(lat) / wall, 3) if wall else 0.0,
           "latencies_ms": [round(x, 1) for x in lat]}
    if lat:
        out.update(p50_ms=round(pct(lat, 50), 1), p95_ms=round(pct(lat, 95), 1), p99_ms=round(pct(lat, 99), 1))
        out["p99_over_p50"] = round(out["p99_ms"] / out["p50_ms"], 2)
    return out


class Load:
    """Closed-loop clients against the server; counts every answered request for the RSS checkpoints."""

    def __init__(self, base: str, queries, pid: int) -> None:
        self.base, self.queries, self.pid = base, queries, pid
        self.sent = 0
        self.lock = threading.Lock()
        self.rss: dict[str, float] = {}

    def _count(self) -> None:
        with self.lock:
            self.sent += 1
            for mark in (100, 1000):
                if self.sent == mark:
                    self.rss[f"after_{mark}"] = rss_mb(self.pid)

    def one(self, client, j: int) -> tuple[int, float]:
        data, prompt, _ = self.queries[j % len(self.queries)]
        t = time.perf_counter()
        r = client.post(self.base + "/v1/attribute", files={"image": ("q.jpg", data, "image/jpeg")},
                        data={"prompt": prompt, "k": "10"})
        ms = (time.perf_counter() - t) * 1e3
        self._count()
        return r.status_code, ms

    def phase(self, clients: int, seconds: float | None = None, until: int | None = None) -> dict:
        import httpx

        lat: list[float] = []
        errors: list[str] = []
        stop = time.perf_counter() + (seconds or 1e9)

        def run(k: int) -> None:
            with httpx.Client(timeout=120) as c:
                j = k
                while (time.perf_counter() < stop and (until is None or self.sent + len(errors) < until)
                       and len(errors) < 50):
                    try:
                        status, ms = self.one(c, j)
                    except Exception as e:  # noqa: BLE001 - counted as an error
                        errors.append(f"{e.__class__.__name__}: {e}")
                        continue
                    if status == 200:
                        lat.append(ms)
                    else:
                        errors.append(f"HTTP {status}")
                    j += clients

        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        return summary(clients, wall, lat, errors)

    def burst(self, n: int) -> dict:
        """n simultaneous requests (a barrier releases them together), then one normal request."""
        import httpx

        codes: list[int] = []
        retry_after: list[str | None] = []
        gate = threading.Barrier(n)

        def run(k: int) -> None:
            data, prompt, _ = self.queries[k % len(self.queries)]
            with httpx.Client(timeout=120) as c:
                gate.wait()
                try:
                    r = c.post(self.base + "/v1/attribute", files={"image": ("q.jpg", data, "image/jpeg")},
                               data={"prompt": prompt})
                    codes.append(r.status_code)
                    retry_after.append(r.headers.get("retry-after"))
                except Exception:  # noqa: BLE001 - counted below as a failed request
                    codes.append(-1)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with httpx.Client(timeout=120) as c:
            t = time.perf_counter()
            after, _ = self.one(c, 0)
            after_ms = (time.perf_counter() - t) * 1e3
        refused = [ra for code, ra in zip(codes, retry_after) if code == 503]
        return {"sent": n, "ok": codes.count(200), "refused_503": len(refused),
                "refused_with_retry_after": sum(1 for ra in refused if ra),
                "other": n - codes.count(200) - len(refused),
                "next_request_status": after, "next_request_ms": round(after_ms, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--models", default="offline", help="model profile (default offline: the real architectures)")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each baseline and server slice")
    ap.add_argument("--rounds", type=int, default=3, help="baseline/server rounds per concurrency")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of warm-up, in-process and server, not counted")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--queue", type=int, default=16, help="the server's --queue (the burst sends 3x this)")
    ap.add_argument("--rss-requests", type=int, default=1000)
    a = ap.parse_args()
    clients = [int(x) for x in a.clients.split(",")]
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))  # stop the server (finally below) when stopped

    import engine

    root = engine.cache_root() / "bench-serve" / f"{a.models}-{a.images}"
    index_dir, queries = build_world(root, a.images, a.models)
    qdir = root / "queries"
    qdir.mkdir(exist_ok=True)
    files = []
    for j, (data, prompt, want) in enumerate(queries):
        (qdir / f"q{j:02d}.jpg").write_bytes(data)
        files.append((qdir / f"q{j:02d}.jpg", prompt, want))

    index = engine.open_index(index_dir)
    print("warming up the in-process index ...", flush=True)
    print(f"  {baseline(index, files, a.warmup)}", flush=True)  # the first ~20 queries of a process are slow

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "engine.cli", "serve", str(index_dir), "--port", str(port), "--no-access-log",
           "--log-level", "warning", "--queue", str(a.queue)]
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    phases, baselines = [], []
    try:
        import httpx

        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        startup_s = time.perf_counter() - t_start
        load = Load(base, queries, proc.pid)
        load.rss["start"] = rss_mb(proc.pid)
        print(f"server up in {startup_s:.1f} s, RSS {load.rss['start']} MB; warming it up ...", flush=True)
        warm = load.phase(max(clients), a.warmup)  # every batch size once, and the same warm-up as in-process
        print(f"  {warm['requests']} requests, {warm['errors']} errors", flush=True)
        for n in clients:
            slices, bases = [], []
            for r in range(a.rounds):
                bases.append(baseline(index, files, a.seconds))
                slices.append(load.phase(n, a.seconds))
                print(f"  {n} client(s), round {r + 1}: baseline {bases[-1]['qps']:.3f} q/s, server "
                      f"{slices[-1]['rps']:.3f} req/s, errors {slices[-1]['errors']}", flush=True)
            ph = summary(n, sum(x["seconds"] for x in slices), [v for x in slices for v in x["latencies_ms"]],
                         ["error"] * sum(x["errors"] for x in slices))
            ph["error_kinds"] = sorted({e for x in slices for e in x["error_kinds"]})
            b_q = sum(x["queries"] for x in bases)
            b_s = sum(x["seconds"] for x in bases)
            ph["baseline_qps"] = round(b_q / b_s, 3)
            ph["vs_baseline"] = round(ph["rps"] / ph["baseline_qps"], 3) if b_q else float("nan")
            ph["rounds"] = [{"baseline_qps": b["qps"], "rps": x["rps"]} for b, x in zip(bases, slices)]
            del ph["latencies_ms"]
            phases.append(ph)
            baselines.extend(bases)
            print(f"  {n} client(s): {ph}", flush=True)
        extra = None
        if load.sent < a.rss_requests:
            print(f"  {a.rss_requests - load.sent} more requests for the memory check ...", flush=True)
            extra = load.phase(max(clients), until=a.rss_requests)
            del extra["latencies_ms"]
        load.rss["end"] = rss_mb(proc.pid)
        info = httpx.get(base + "/v1/info", timeout=10).json()["service"]["stats"]
        burst = load.burst(3 * a.queue)
        print(f"  burst: {burst}", flush=True)
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        index.close()

    at8 = next((ph for ph in phases if ph["clients"] == max(clients)), phases[-1])
    growth = load.rss["after_1000"] / load.rss["after_100"] if "after_1000" in load.rss else float("nan")
    checks = {
        "no_errors": all(ph["errors"] == 0 for ph in phases) and (extra is None or extra["errors"] == 0),
        f"throughput_at_{at8['clients']}_ge_0.9x_baseline": at8["vs_baseline"] >= 0.9,
        "p99_le_3x_p50": all(ph.get("p99_over_p50", 99) <= 3.0 for ph in phases),
        "rss_growth_100_to_1000_le_10pct": growth <= 1.10,
        "burst_gets_503_with_retry_after": burst["refused_503"] > 0
        and burst["refused_with_retry_after"] == burst["refused_503"] and burst["other"] == 0,
        "answers_right_after_burst": burst["next_request_status"] == 200,
        "sigterm_exit_0": exit_code == 0,
    }
    payload = {
        "config": {"images": a.images, "models": a.models, "untrained": True, "seconds": a.seconds,
                   "rounds": a.rounds,
                   "clients": clients, "queue": a.queue, "server": " ".join(cmd[2:]), "k": 10,
                   "queries": "32 crops of training scenes, JPEG q85, with their captions as prompts"},
        "baseline_slices": baselines,
        "phases": phases, "extra_for_rss": extra,
        "rss_mb": {**load.rss, "growth_100_to_1000": round(growth, 4)},
        "burst": burst, "server_stats": info, "startup_s": round(startup_s, 1), "sigterm_exit_code": exit_code,
        "checks": checks,
    }
    path = save("bench_serve", payload)
    rows = []
    for ph in phases:
        rows.append((f"{ph['clients']} client(s): baseline queries/s (in-process, sequential, same rounds)",
                     f"{ph['baseline_qps']:.3f}", ""))
        rows.append((f"{ph['clients']} client(s): requests/s (x baseline)",
                     f"{ph['rps']:.2f} ({ph['vs_baseline']:.2f}x)", ">= 0.9x at 8" if ph is at8 else ""))
        rows.append((f"{ph['clients']} client(s): p50 / p95 / p99 ms",
                     f"{ph.get('p50_ms')} / {ph.get('p95_ms')} / {ph.get('p99_ms')}", "p99 <= 3 x p50"))
        rows.append((f"{ph['clients']} client(s): errors", str(ph["errors"]), "0"))
    rows.append(("RSS MB start / after 100 / after 1000", f"{load.rss.get('start')} / {load.rss.get('after_100')} / "
                 f"{load.rss.get('after_1000')}", "<= +10% (100 -> 1000)"))
    rows.append((f"burst of {burst['sent']}: ok / 503 / other", f"{burst['ok']} / {burst['refused_503']} / "
                 f"{burst['other']}", "some 503, no other"))
    rows.append(("request right after the burst", str(burst["next_request_status"]), "200"))
    rows.append(("largest batch the worker encoded", str(info.get("largest_batch")), ""))
    rows.append(("SIGTERM exit code", str(exit_code), "0"))
    table(f"attrib serve ({a.models} profile, UNTRAINED weights, {a.images} images)", rows)
    print(json.dumps(checks, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
