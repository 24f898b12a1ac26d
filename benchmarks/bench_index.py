"""Indexing throughput against the bare model forward, and bytes on disk per image.

Usage: python benchmarks/bench_index.py [--images 200] [--models offline] [--repeats 2] [--chunk N]
       python benchmarks/bench_index.py --engine ray [--chunk 50] [--ray-workers 1]   (pip install '.[ray]')

(a) bare model-forward throughput of both encoders on pre-decoded uint8 tensors (the same batch size);
(b) end-to-end `attrib index` throughput: ingestion, parallel decoding/resizing, encoding, all stores, faiss,
    tantivy and the manifest, on the same images (models loaded once beforehand; their one-off load time is
    reported separately).
Prints and saves b/a (target >= 0.90) and bytes per indexed image by component (target <= 16 KB in total).
With --engine ray also (c): the same build with `--engine ray` on a Ray started on this machine with the same
CPU budget (one worker holding every CPU, unless --ray-workers says otherwise), its images/s counted after the
start-up (starting Ray, the worker loading the models), which is reported separately; target c/b >= 0.80.
Results are for UNTRAINED weights when --models is offline/tiny (speed and size do not depend on training).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import save, table


def make_images(folder: Path, n: int, size: int) -> None:
    from engine.scenes import caption_of, random_scene, render

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([11, i])
        spec = random_scene(rng)
        im = render(spec, size)
        if i % 2:
            im.save(folder / f"{i:05d}.jpg", quality=90)
        else:
            im.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption_of(spec, rng))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=384, help="side of the generated images in pixels")
    ap.add_argument("--models", default="offline")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=2, help="alternating (a, b) rounds; the best of each is kept")
    ap.add_argument("--chunk", type=int, default=None, help="images per segment / per unit of a Ray build")
    ap.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="ray: also build with --engine ray and compare (c) with (b)")
    ap.add_argument("--ray-workers", type=int, default=1, help="worker actors of the Ray builds (default 1)")
    args = ap.parse_args()

    import engine
    from engine.images import ImageLimits, encoder_inputs, read_bytes

    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        make_images(work / "src", args.images, args.size)
        t = time.perf_counter()
        enc = engine.load_encoders(args.models, device=args.device)
        load_s = time.perf_counter() - t
        settings = engine.IndexSettings(**({"chunk": args.chunk} if args.chunk else {}))
        files = sorted(p for p in (work / "src").iterdir() if p.suffix in (".png", ".jpg"))
        clip_u8, dino_u8 = [], []
        for p in files:
            cu8, du8 = encoder_inputs(read_bytes(str(p)), ImageLimits(), enc.clip_input, enc.dino_input)
            clip_u8.append(cu8)
            dino_u8.append(du8)
        clip_u8, dino_u8 = np.stack(clip_u8), np.stack(dino_u8)
        bs = settings.batch_size
        enc.encode_images(clip_u8[:bs], dino_u8[:bs], settings.patch_grid)  # warm-up

        def forward() -> float:
            t0 = time.perf_counter()
            for s in range(0, len(files), bs):
                enc.encode_images(clip_u8[s:s + bs], dino_u8[s:s + bs], settings.patch_grid)
            return len(files) / (time.perf_counter() - t0)

        def end_to_end() -> tuple[float, engine.BuildSummary]:
            out = work / "index"
            t0 = time.perf_counter()
            s = engine.build_index(work / "src", out, encoders=enc, settings=settings, overwrite=True, progress=False,
                                   calibrate=False)  # encoding throughput only
            return s.records / (time.perf_counter() - t0), s

        def on_ray() -> tuple[float, float, engine.BuildSummary]:
            out = work / "index-ray"
            s = engine.build_index_ray(work / "src", out, models=args.models, device=args.device, settings=settings,
                                       cluster=engine.ClusterSettings(workers=args.ray_workers), overwrite=True,
                                       progress=False, calibrate=False)
            return s.records / (s.seconds - s.startup_seconds), s.records / s.seconds, s

        a_runs, b_runs, c_runs, c_total, startups = [], [], [], [], []
        for _ in range(args.repeats):
            a_runs.append(forward())
            b, summary = end_to_end()
            b_runs.append(b)
            if args.engine == "ray":
                c, c_all, rs = on_ray()
                c_runs.append(c)
                c_total.append(c_all)
                startups.append(rs.startup_seconds)
        a, b = max(a_runs), max(b_runs)
        info = engine.index_info(work / "index")
        per_image = info["bytes_per_image"]
        ratio = b / a
        rows = [
            ("images", str(args.images), ""),
            ("(a) bare forward, both encoders", f"{a:.2f} img/s", ""),
            ("(b) end-to-end index", f"{b:.2f} img/s", ""),
            ("b / a", f"{ratio:.3f}", ">= 0.90"),
            ("model load (one-off)", f"{load_s:.1f} s", ""),
        ]
        ray_result = {}
        if args.engine == "ray":
            c = max(c_runs)
            rows += [
                (f"(c) end-to-end index, --engine ray ({args.ray_workers} worker)", f"{c:.2f} img/s", ""),
                ("c / b", f"{c / b:.3f}", ">= 0.80"),
                ("ray start-up (Ray + workers loading the models)", f"{min(startups):.1f} s", ""),
                ("(c) including its start-up", f"{max(c_total):.2f} img/s", ""),
            ]
            ray_result = {"ray_img_per_s": c_runs, "ray_img_per_s_with_startup": c_total,
                          "ray_startup_s": startups, "ratio_c_over_b": c / b, "target_ratio_c_over_b": 0.80,
                          "ray_workers": args.ray_workers, "chunk": settings.chunk}
        rows += [(f"bytes/image: {k}", f"{v:,.0f}", "")
                 for k, v in sorted(per_image.items(), key=lambda kv: -kv[1]) if k != "total"]
        rows.append(("bytes/image: total", f"{per_image['total']:,.0f}", "<= 16,384"))
        untrained = not enc.profile.pretrained
        table(f"bench_index ({args.models}{', UNTRAINED weights' if untrained else ''})", rows)
        path = save("bench_index" if args.engine == "local" else "bench_index_ray", {**ray_result,
            "models": args.models, "untrained": untrained, "images": args.images, "image_side": args.size,
            "batch_size": bs, "forward_img_per_s": a_runs, "end_to_end_img_per_s": b_runs, "ratio_b_over_a": ratio,
            "target_ratio": 0.90, "model_load_s": load_s, "bytes_per_image": per_image, "target_bytes_per_image": 16384,
            "encode_seconds_inside_build": summary.encode_seconds, "build_seconds": summary.seconds,
        })
        print(f"saved {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
