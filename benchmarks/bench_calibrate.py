"""Self-calibration cost against the build it follows: `attrib index` with calibration, timed in one run.

Usage: python benchmarks/bench_calibrate.py [--images 2000 | --source CORPUS] [--models offline]

Builds an index (of generated scenes, or of --source: a folder or table) and calibrates it at the end, as
`attrib index` does by default. Prints and saves: the build's time and its encoding time, the calibration's
time (encoding, ranking, learning), its share of the build time and of the build's encoding time (target:
about a fifth of the encoding time for large corpora), the number of self-made queries and the held-out fit.
Results are for UNTRAINED weights when --models is offline/tiny (cost does not depend on training; the fit does).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import save, table
from bench_index import make_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="generated images (ignored with --source)")
    ap.add_argument("--source", default=None, help="a folder or table to index instead of generated scenes")
    ap.add_argument("--size", type=int, default=256, help="side of the generated images in pixels")
    ap.add_argument("--models", default="offline")
    ap.add_argument("--device", default=None)
    ap.add_argument("--keep", default=None, help="keep the calibrated index in this folder")
    args = ap.parse_args()

    import engine

    work = Path(tempfile.mkdtemp(prefix="bench-calibrate-"))
    try:
        source = args.source
        if source is None:
            make_images(work / "src", args.images, args.size)
            source = work / "src"
        out = Path(args.keep) if args.keep else work / "index"
        s = engine.build_index(source, out, models=args.models, device=args.device, calibrate=True,
                               overwrite=bool(args.keep))
        cal = s.calibration or {}
        if cal.get("skipped"):
            raise SystemExit(f"calibration was skipped: {cal['skipped']}")
        w = engine.FusionWeights.load(out / "calibration.json")
        secs = w.provenance["seconds"]
        payload = {
            "images": s.images, "models": args.models, "untrained": engine.open_index(out).untrained,
            "build_seconds": round(s.seconds, 3), "build_encode_seconds": round(s.encode_seconds, 3),
            "calibration_seconds": secs, "share_of_build": cal.get("share_of_build"),
            "share_of_build_encoding": cal.get("share_of_build_encoding"),
            "calibration_encoding_share_of_build_encoding": cal.get("encoding_share_of_build_encoding"),
            "queries": w.provenance["counts"], "test": w.provenance["scores"]["test"],
            "threshold": w.threshold,
        }
        path = save("calibrate", payload)
        table(f"self-calibration after indexing {s.images} images ({args.models})", [
            ("build (s)", f"{s.seconds:.1f}", ""),
            ("build encoding (s)", f"{s.encode_seconds:.1f}", ""),
            ("calibration (s)", f"{secs['total']:.1f}", ""),
            ("  of which encoding / ranking / learning (s)",
             f"{secs.get('encode', 0):.1f} / {secs.get('rank', 0):.1f} / {secs.get('learn', 0):.1f}", ""),
            ("calibration / build time", f"{cal.get('share_of_build', 0):.3f}", ""),
            ("calibration / build encoding time", f"{cal.get('share_of_build_encoding', 0):.3f}", "~0.2 (large)"),
            ("self-made queries (encoded images)",
             f"{w.provenance['counts']['queries']} ({w.provenance['counts']['encoded_images']})", ""),
            ("held-out map@100 / false attribution",
             f"{w.provenance['scores']['test'].get('map@100')} / "
             f"{w.provenance['scores']['test'].get('false_attribution_rate')}", ""),
        ])
        print(f"saved {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
