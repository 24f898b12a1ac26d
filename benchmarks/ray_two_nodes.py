"""A two-node Ray cluster on one machine builds the same index as a local build, even when one node is killed
in the middle of the build.

Usage: python benchmarks/ray_two_nodes.py [--images 48] [--models offline] [--chunk 4] [--kill-after 2]
       (needs pip install '.[ray]'; uses the `ray` command of this Python's environment)

Steps (each printed as it runs):
 1. a local build of a generated folder (the reference): `attrib index SRC --out REF --chunk C`;
 2. `ray start --head --num-cpus 1 --block` and `ray start --address HEAD --num-cpus 1 --block`, each in its own
    session, so each node can be killed alone (nothing else on the machine is touched: no `ray stop`); every
    command runs with RAY_AUTH_MODE=token (Ray's token authentication; `ray get-auth-token --generate` makes
    ~/.ray/auth_token when missing) unless RAY_AUTH_MODE is set;
 3. `attrib index SRC --out OUT --engine ray --address HEAD --ray-workers 2 --cpus-per-worker 1 --chunk C`
    (one worker per node);
 4. once the driver has committed --kill-after units, SIGKILL every process of the second node (raylet,
    its worker, its agents): the units it held go to the surviving worker;
 5. the driver must finish (exit 0) and its index must equal the reference (same ids, rows, vectors, caption
    CLIP embeddings and caption keys).
Saves results/ray_two_nodes.json. The models are UNTRAINED with --models offline/tiny (the check is about the
index being the same, which does not depend on training).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import save, table
from bench_index import make_images

ROOT = Path(__file__).resolve().parents[1]


def session_pids(sid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid and "State:\tZ" not in (d / "status").read_text():
                    out.append(int(d.name))
            except (OSError, ProcessLookupError):
                continue
    return out


def kill_session(sid: int, timeout: float = 60) -> int:
    """SIGKILL every process of session ``sid`` (one we started with start_new_session); returns how many."""
    killed = set()
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = session_pids(sid)
        if not left:
            return len(killed)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise RuntimeError(f"session {sid} survives: {session_pids(sid)}")


def snapshot(index: Path) -> dict:
    """id -> (row, clip vector, dino descriptor, patch cells, caption embedding, caption key) of every record."""
    import engine

    idx = engine.open_index(index)
    r = idx.reader
    rows, ids = r.all_ids()
    has, clip = r.vectors("clip", rows)
    _, dino = r.vectors("dino", rows)
    _, cells = r.patch_cells(rows)
    captions = {}  # row -> (caption embedding, caption key), read segment by segment
    for seg in r.segments:
        local = np.arange(seg.n_records)
        emb = seg.caption_vectors(local) if seg.caption_codes is not None else [None] * seg.n_records
        keys = np.asarray(seg.caption_keys).tolist() if seg.caption_keys is not None else [None] * seg.n_records
        for k, row in enumerate(np.asarray(seg.rows).tolist()):
            captions[row] = (None if emb[k] is None else np.array(emb[k]), keys[k])
    out, j = {}, 0
    for row, rid, h in zip(rows.tolist(), ids.tolist(), has.tolist()):
        out[rid] = ((row, clip[j], dino[j], cells[j]) if h else (row, None, None, None)) + captions[row]
        j += h
    idx.close()
    return out


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--models", default="offline")
    ap.add_argument("--chunk", type=int, default=4, help="images per unit")
    ap.add_argument("--kill-after", type=int, default=2, help="kill the second node once this many units committed")
    ap.add_argument("--port", type=int, default=6391, help="the head node's GCS port")
    args = ap.parse_args()

    ray_bin = str(Path(sys.executable).with_name("ray"))
    attrib = [sys.executable, "-m", "engine.cli"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    # Ray 2.60 (tested here) turns token authentication on for a new `ray start --head` when ~/.ray/auth_token
    # exists; a joining node and `ray status` use it only with RAY_AUTH_MODE=token. So: a token (made when missing,
    # `ray get-auth-token --generate`) and token mode for every command, unless the caller chose a mode.
    if "RAY_AUTH_MODE" not in env:
        env["RAY_AUTH_MODE"] = "token"
        if not env.get("RAY_AUTH_TOKEN") and not env.get("RAY_AUTH_TOKEN_PATH"):
            subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, check=True, stdout=subprocess.DEVNULL)
    addr = f"127.0.0.1:{args.port}"
    work = Path(tempfile.mkdtemp(prefix="ray-two-nodes-"))
    nodes: dict[str, subprocess.Popen] = {}
    result: dict = {"images": args.images, "models": args.models, "chunk": args.chunk, "kill_after": args.kill_after}
    try:
        src, ref, out = work / "src", work / "ref", work / "idx"
        make_images(src, args.images, args.size)
        common = ["--models", args.models, "--chunk", str(args.chunk), "--no-progress", "--json"]
        say(f"local reference build: attrib index {src} --out {ref} {' '.join(common)}")
        t = time.perf_counter()
        subprocess.run([*attrib, "index", str(src), "--out", str(ref), *common], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        result["local_seconds"] = time.perf_counter() - t

        head_cmd = [ray_bin, "start", "--head", "--num-cpus", "1", "--port", str(args.port), "--block",
                    "--include-dashboard=false", "--dashboard-agent-listen-port", "52401"]
        node_cmd = [ray_bin, "start", "--address", addr, "--num-cpus", "1", "--block",
                    "--dashboard-agent-listen-port", "52402", "--min-worker-port", "21000",
                    "--max-worker-port", "21999"]
        say("head:   " + " ".join(head_cmd[1:]))
        nodes["head"] = subprocess.Popen(head_cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                         stderr=open(work / "head.log", "w"))
        wait_nodes(ray_bin, addr, 1, env)
        say("node 2: " + " ".join(node_cmd[1:]))
        nodes["node2"] = subprocess.Popen(node_cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=open(work / "node2.log", "w"))
        wait_nodes(ray_bin, addr, 2, env)

        cmd = [*attrib, "index", str(src), "--out", str(out), "--engine", "ray", "--address", addr,
               "--ray-workers", "2", "--cpus-per-worker", "1", *common]
        say("driver: attrib " + " ".join(cmd[3:]))
        t = time.perf_counter()
        driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        committed = wait_units(out, driver, args.kill_after)
        n = kill_session(nodes["node2"].pid)
        nodes["node2"].wait(timeout=30)
        say(f"killed node 2 ({n} processes) after {committed} units were committed, "
            f"{time.perf_counter() - t:.1f} s into the build")
        result["killed_after_units"] = committed
        result["killed_processes"] = n
        stdout, err = driver.communicate(timeout=3600)
        result["ray_seconds"] = time.perf_counter() - t
        result["driver_exit"] = driver.returncode
        say(f"driver exited {driver.returncode} after {result['ray_seconds']:.1f} s")
        if driver.returncode != 0:
            print(err.decode()[-3000:])
            raise SystemExit(1)
        try:
            summary = json.loads(stdout)
        except ValueError:
            print(f"the driver's stdout is not its JSON summary:\n{stdout.decode(errors='replace')[:3000]}")
            raise SystemExit(1) from None
        result["summary"] = {k: summary[k] for k in ("records", "images", "rejected", "reject_reasons", "segments",
                                                     "encoded_this_run", "startup_seconds", "seconds")}
        a, b = snapshot(ref), snapshot(out)
        diffs = [float(np.abs(x - y).max()) for k in a if k in b for x, y in zip(a[k][1:5], b[k][1:5])
                 if x is not None and y is not None]
        cap_diffs = [float(np.abs(a[k][4] - b[k][4]).max()) for k in a
                     if k in b and a[k][4] is not None and b[k][4] is not None]
        result.update(same_ids=set(a) == set(b), same_rows=all(a[k][0] == b.get(k, (None,))[0] for k in a),
                      records=[len(a), len(b)], max_abs_vector_diff=max(diffs) if diffs else None,
                      caption_embeddings=[sum(v[4] is not None for v in a.values()),
                                          sum(v[4] is not None for v in b.values())],
                      max_abs_caption_diff=max(cap_diffs) if cap_diffs else None,
                      same_caption_keys=all(a[k][5] == b[k][5] and a[k][5] is not None for k in a if k in b))
        ok = result["same_ids"] and result["same_rows"] and (result["max_abs_vector_diff"] or 0) <= 1e-3 \
            and result["caption_embeddings"] == [len(a), len(b)] and result["same_caption_keys"] \
            and (result["max_abs_caption_diff"] or 0) <= 1e-3
        result["same_index"] = bool(ok)
        untrained = args.models in ("offline", "tiny")
        table(f"ray_two_nodes ({args.models}{', UNTRAINED weights' if untrained else ''})", [
            ("images / chunk (images per unit)", f"{args.images} / {args.chunk}", ""),
            ("node killed after units committed", str(committed), ""),
            ("driver exit code", str(driver.returncode), "0"),
            ("records: local / ray", f"{len(a)} / {len(b)}", "equal"),
            ("same ids, same rows", f"{result['same_ids']}, {result['same_rows']}", "True, True"),
            ("max |vector difference|", f"{result['max_abs_vector_diff']:.2e}", "<= 1e-3 (fp16)"),
            ("caption embeddings: local / ray", "{} / {}".format(*result["caption_embeddings"]), "every record"),
            ("max |caption embedding difference|", f"{result['max_abs_caption_diff']:.2e}", "<= 1e-3 (fp16)"),
            ("same caption keys", str(result["same_caption_keys"]), "True"),
            ("rejected (units failed)", str(summary["rejected"]), "0"),
            ("local build / ray build (with start-up)", f"{result['local_seconds']:.1f} s / "
                                                        f"{result['ray_seconds']:.1f} s", ""),
        ])
        path = save("ray_two_nodes", {**result, "untrained": untrained})
        print(f"saved {path}")
        if not ok:
            raise SystemExit(1)
    finally:
        for p in nodes.values():
            if p.poll() is None or session_pids(p.pid):
                kill_session(p.pid)
        shutil.rmtree(work, ignore_errors=True)


def wait_nodes(ray_bin: str, addr: str, n: int, env: dict, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run([ray_bin, "status", "--address", addr], env=env, capture_output=True, text=True)
        if r.returncode == 0 and f"/{float(n)} CPU" in r.stdout:
            return
        time.sleep(1)
    why = (r.stderr.strip().splitlines() or [""])[-1][:300]
    raise RuntimeError(f"the cluster at {addr} never had {n} nodes (last `ray status`: {why})")


def wait_units(out: Path, driver: subprocess.Popen, n: int, timeout: float = 1800) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            m = json.loads((out / "manifest.json").read_text())
            done = int(m["build"]["ray"]["units_committed"])
            if done >= n:
                return done
        except (OSError, ValueError, KeyError):
            pass
        if driver.poll() is not None:
            raise RuntimeError(f"the build ended before a node could be killed: {driver.stderr.read().decode()}")
        time.sleep(0.1)
    raise RuntimeError("the build never committed enough units")


if __name__ == "__main__":
    main()
