"""Input-pipeline throughput per host: clips/s of the pre-training and test pipelines.

Writes a synthetic token store (random codes, `write_test_store`) unless --store names one, then
times `make_iterator` over `pretrain_dataset` (2 clips per video) and `eval_dataset` (crops x
num_clips views per video) after a warm-up. Run from the repository root:

    python benchmarks/input_pipeline.py --workers 0,2 --append_results benchmarks/RESULTS.md

The records are the cost: each example reads and decodes a whole stored video (frames x h x w
int16), so --frames and --grid matter more than the clip length.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vimpac_jax.data import pipelines  # noqa: E402
from vimpac_jax.data.testing import write_test_store  # noqa: E402

CROPS = ("r128_start_noflip", "r128_center_noflip", "r128_end_noflip")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", help="an existing token store (default: generate one in a temp dir)")
    p.add_argument("--videos", type=int, default=2000, help="videos in the generated store")
    p.add_argument("--frames", type=int, default=120, help="stored frames per video (120 = 1 min at 2 fps)")
    p.add_argument("--grid", type=int, default=16, help="token grid side: 16 for 128 px, 32 for 256 px")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard_options", default="group_size:1",
                   help="ArrayRecord writer options of the generated store (default: as `vimpac tokenize`)")
    p.add_argument("--workers", default="0", help="comma-separated worker-process counts to time, e.g. 0,2,8")
    p.add_argument("--read_threads", type=int, default=8, help="grain read threads (per worker)")
    p.add_argument("--batch_size", type=int, default=64, help="videos per batch (per host)")
    p.add_argument("--clip_len", type=int, default=5, help="pre-training clip length T")
    p.add_argument("--eval_clip_len", type=int, default=10)
    p.add_argument("--num_clips", type=int, default=10, help="test clips per crop")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per configuration")
    p.add_argument("--warmup", type=int, default=3, help="batches before timing starts")
    p.add_argument("--append_results", help="append a markdown section with the numbers to this file")
    p.add_argument("--note", default="", help="free text for the results section (e.g. the machine's load)")
    args = p.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers must be comma-separated integers, got {args.workers!r}")
    if any(w < 0 for w in args.workers):
        p.error("--workers must be >= 0")
    for name in ("videos", "frames", "grid", "shards", "batch_size", "clip_len", "eval_clip_len", "num_clips"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def _time(dataset, *, workers: int, read_threads: int, seconds: float, warmup: int) -> tuple[int, float]:
    """(batches, seconds) over at least `seconds` after `warmup` batches (epochs wrap for train)."""
    it = pipelines.make_iterator(dataset, workers=workers, read_threads=read_threads)
    try:
        for _ in range(warmup):
            next(it)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            try:
                next(it)
            except StopIteration:
                break
            n += 1
        return n, time.perf_counter() - t0
    finally:
        if hasattr(it, "close"):
            it.close()


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main(argv=None) -> int:
    args = _parse(argv)
    tmp = None
    if args.store:
        store = Path(args.store)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="vimpac-bench-")
        store = Path(tmp.name) / "store"
        t0 = time.perf_counter()
        videos = [dict(video_id=f"v{i:06d}", label=i % 101, num_frames=args.frames, variants=list(CROPS))
                  for i in range(args.videos)]
        write_test_store(store, videos, grid=(args.grid, args.grid), shards=args.shards, seed=0,
                         options=args.shard_options)
        print(f"generated {args.videos} videos x {len(CROPS)} crops x {args.frames} frames x "
              f"{args.grid}x{args.grid} in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        index = pipelines.load_index(store)
        pre_variants = ["r128_center_noflip"] if "r128_center_noflip" in index.variants else None
        eval_variants = pipelines.default_test_variants(index.variants)
        rows = []
        for workers in args.workers:
            pre = pipelines.pretrain_dataset(index, batch_size=args.batch_size, clip_len=args.clip_len, seed=0,
                                             variants=pre_variants, process_index=0, process_count=1)
            n, dt = _time(pre, workers=workers, read_threads=args.read_threads, seconds=args.seconds,
                          warmup=args.warmup)
            videos = n * args.batch_size / dt
            rows.append(("pretrain", workers, videos, 2 * videos,
                         f"T={args.clip_len}, 2 clips/video"))
            ev = pipelines.eval_dataset(index, batch_size=args.batch_size, clip_len=args.eval_clip_len,
                                        num_clips=args.num_clips, variants=eval_variants,
                                        process_index=0, process_count=1)
            # Repeated: a finite test set would run dry inside the timing window.
            n, dt = _time(ev.repeat(), workers=workers, read_threads=args.read_threads, seconds=args.seconds,
                          warmup=args.warmup)
            videos = n * args.batch_size / dt
            views = len(eval_variants) * args.num_clips
            rows.append(("test", workers, videos, views * videos,
                         f"T={args.eval_clip_len}, {len(eval_variants)} crops x {args.num_clips} clips"))
            for r in rows[-2:]:
                print(f"{r[0]:9s} workers={r[1]:2d}  {r[2]:9.1f} videos/s  {r[3]:10.1f} clips/s  ({r[4]})", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    if args.append_results:
        store_desc = (f"`{args.store}`" if args.store else
                      f"generated: {args.videos} videos x {len(CROPS)} crops x {args.frames} frames x "
                      f"{args.grid}x{args.grid} tokens (random codes), {args.shards} shards, "
                      f"writer options `{args.shard_options}`")
        lines = [
            "",
            f"## Input pipeline (`benchmarks/input_pipeline.py`), {datetime.date.today().isoformat()}",
            "",
            f"Machine: {_machine()}. Store: {store_desc}. Batch {args.batch_size} videos per host, "
            f"{args.read_threads} read threads per worker, {args.seconds:g} s timed per row."
            + (f" {args.note}" if args.note else ""),
            "",
            "| pipeline | workers | videos/s | clips/s | clips |",
            "|---|---|---|---|---|",
            *[f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]} |" for r in rows],
            "",
            "Command: `python benchmarks/input_pipeline.py " + shlex.join(argv if argv is not None else sys.argv[1:]) + "`",
            "",
        ]
        with open(args.append_results, "a") as f:  # append: other sections belong to others
            f.write("\n".join(lines))
        print(f"appended to {args.append_results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
