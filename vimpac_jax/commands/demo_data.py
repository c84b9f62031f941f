"""`vimpac demo-data --out DIR [--preset default|full] [--seed S] [--workers N] [--force]`.

Generates the built-in motion dataset (vimpac_jax/demo/data.py): 8 classes (move
left/right/up/down, rotate cw/ccw, grow, shrink) that a single frame cannot tell apart, as H.264
mp4 files with mmaction2 lists: pool.txt (unlabelled, for pre-training), train.txt and val.txt
(`path label`, class-balanced), classes.txt, dataset.json, README.txt. List paths are relative
to DIR: pass `--video-root DIR` to `vimpac tokenize`. The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import sys


def _counts(text: str) -> dict:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected split=N[,split=N...], e.g. pool=32,train=16, got {text!r}")
        out[name.strip()] = int(value)
    return out


def _parser() -> argparse.ArgumentParser:
    from vimpac_jax.demo.data import PRESETS

    presets = ", ".join(f"{k}: {p.size}px {p.num_frames} frames at {p.fps} fps, pool {p.pool} / train {p.train} / "
                        f"val {p.val}" for k, p in PRESETS.items())
    p = argparse.ArgumentParser(prog="vimpac demo-data", description=__doc__.split("\n\n")[1],
                                epilog=f"presets: {presets}")
    p.add_argument("--out", required=True, help="dataset directory (must be absent or empty, unless --force)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="dataset size (default: default)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: usable cores; 0 = in process)")
    p.add_argument("--counts", type=_counts, default=None,
                   help="override videos per split, e.g. pool=64,train=32,val=16 (smoke tests)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out once the new dataset is complete")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv) -> int:
    args = _parser().parse_args(argv)
    if args.seed < 0:
        print("vimpac demo-data: error: --seed must be >= 0", file=sys.stderr)
        return 2
    from vimpac_jax.demo.data import write_demo_dataset

    try:
        s = write_demo_dataset(args.out, preset=args.preset, seed=args.seed, workers=args.workers,
                               counts=args.counts, force=args.force, progress=not args.quiet)
    except (ValueError, FileExistsError) as e:
        print(f"vimpac demo-data: error: {e}", file=sys.stderr)
        return 2
    c = s["counts"]
    print(f"wrote {s['out_dir']}: pool={c['pool']} train={c['train']} val={c['val']} videos, "
          f"{s['size']}x{s['size']} px, {s['num_frames']} frames at {s['fps']} fps, "
          f"{s['bytes'] / 1e6:.1f} MB in {s['seconds']:.1f}s")
    print(f"lists: {s['lists']['pool']} {s['lists']['train']} {s['lists']['val']} (paths relative to {s['out_dir']})")
    return 0
