"""Input-pipeline throughput per host: clips/s of the pre-training and test pipelines.

Writes synthetic token stores (random codes, `write_test_store`; one per --frames x --grid)
unless --store names one, then times `make_iterator` over `train_dataset(index,
"pretrain")` (2 clips per video) and `eval_dataset` (crops x num_clips views per video) after a
warm-up. Run from the
repository root:

    python benchmarks/input_pipeline.py --frames 120,780 --grid 16,32 \
        --workers 0,1,2 --append_results benchmarks/RESULTS.md

An example reads only the chunks its clips need. (The old "whole" layout, whose examples read and
decoded whole stored videos, was measured here before the readers stopped reading it; its rows
stay in RESULTS.md.)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, sys.path[0] is benchmarks/, whose tokenize.py would shadow the standard
# library's (imported by inspect): put the repository root there instead.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vimpac_jax.data import pipelines  # noqa: E402
from vimpac_jax.data.testing import write_test_store  # noqa: E402

CROPS = ("r128_start_noflip", "r128_center_noflip", "r128_end_noflip")


def _ints(p, name, value):
    try:
        values = [int(v) for v in value.split(",")]
    except ValueError:
        p.error(f"--{name} must be comma-separated integers, got {value!r}")
    if any(v < 0 for v in values):
        p.error(f"--{name} must be >= 0")
    return values


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", help="an existing token store (default: generate stores in a temp dir)")
    p.add_argument("--videos", type=int, default=2000, help="videos in a generated store (at most; see --max_mb)")
    p.add_argument("--max_mb", type=float, default=600.0,
                   help="cap on a generated store's raw token size: fewer videos for long videos / big grids")
    p.add_argument("--frames", default="120", help="stored frames per video, comma-separated (120 = 1 min at 2 fps; "
                                                   "780 = HowTo100M's mean length)")
    p.add_argument("--grid", default="16", help="token grid sides, comma-separated: 16 for 128 px, 32 for 256 px")
    p.add_argument("--chunk_frames", type=int, default=16, help="frames per record of the generated stores")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard_options", default="group_size:1",
                   help="ArrayRecord writer options of the generated store (default: as `vimpac tokenize`)")
    p.add_argument("--pipelines", default="pretrain,test", help="pipelines to time: pretrain and/or test")
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
    args.workers = _ints(p, "workers", args.workers)
    args.frames = _ints(p, "frames", args.frames)
    args.grid = _ints(p, "grid", args.grid)
    args.pipelines = args.pipelines.split(",")
    if set(args.pipelines) - {"pretrain", "test"}:
        p.error("--pipelines takes pretrain,test")
    for name in ("videos", "shards", "batch_size", "clip_len", "eval_clip_len", "num_clips", "chunk_frames"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if min(args.frames + args.grid) < 1:
        p.error("--frames and --grid must be >= 1")
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


def _generate(root: Path, args, frames: int, grid: int) -> tuple[Path, str]:
    per_video = len(CROPS) * frames * grid * grid * 2
    num_videos = max(args.batch_size, min(args.videos, int(args.max_mb * 2 ** 20 // per_video)))
    store = root / f"chunked-{frames}x{grid}"
    t0 = time.perf_counter()
    videos = [dict(video_id=f"v{i:06d}", label=i % 101, num_frames=frames, variants=list(CROPS))
              for i in range(num_videos)]
    write_test_store(store, videos, grid=(grid, grid), shards=args.shards, seed=0, options=args.shard_options,
                     chunk_frames=args.chunk_frames)
    print(f"generated {num_videos} videos x {len(CROPS)} crops x {frames} frames x {grid}x{grid} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    desc = f"{num_videos} videos x {frames} frames, {grid}x{grid}"
    return store, desc


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv=None) -> int:
    args = _parse(argv)
    tmp = tempfile.TemporaryDirectory(prefix="vimpac-bench-") if not args.store else None
    cores = _cores()
    rows = []  # (store, layout, pipeline, workers, videos/s, clips/s, clips/s per core, clips)
    try:
        if args.store:
            stores = [(Path(args.store), f"`{args.store}`", "chunked")]
        else:
            # Made one at a time, just before it is timed, and removed after (disk).
            stores = ((*_generate(Path(tmp.name), args, f, g), "chunked") for f in args.frames for g in args.grid)
        for store, desc, layout in stores:
            index = pipelines.load_index(store)
            pre_variants = ["r128_center_noflip"] if "r128_center_noflip" in index.variants else None
            eval_variants = pipelines.default_test_variants(index.variants)
            for workers in args.workers:
                for kind in args.pipelines:
                    if kind == "pretrain":
                        ds = pipelines.train_dataset(index, "pretrain", batch_size=args.batch_size,
                                                     clip_len=args.clip_len, seed=0, variants=pre_variants,
                                                     process_index=0, process_count=1)
                        views, what = 2, f"pretrain T={args.clip_len}, 2 clips/video"
                    else:
                        # Repeated: a finite test set would run dry inside the timing window.
                        ds = pipelines.eval_dataset(index, batch_size=args.batch_size, clip_len=args.eval_clip_len,
                                                    num_clips=args.num_clips, variants=eval_variants,
                                                    process_index=0, process_count=1).repeat()
                        views = len(eval_variants) * args.num_clips
                        what = f"test T={args.eval_clip_len}, {len(eval_variants)} crops x {args.num_clips} clips"
                    n, dt = _time(ds, workers=workers, read_threads=args.read_threads, seconds=args.seconds,
                                  warmup=args.warmup)
                    videos = n * args.batch_size / dt
                    rows.append((desc, layout, what, workers, videos, views * videos, views * videos / cores))
                    r = rows[-1]
                    print(f"{desc:32s} {layout:8s} {what:32s} workers={workers}  {r[4]:8.0f} videos/s  "
                          f"{r[5]:9.0f} clips/s  {r[6]:8.0f} clips/s/core  (load {os.getloadavg()[0]:.1f})",
                          flush=True)
            if tmp is not None:
                shutil.rmtree(store)
    finally:
        if tmp is not None:
            tmp.cleanup()

    if args.append_results:
        load = os.getloadavg()
        lines = [
            "",
            f"## Input pipeline (`benchmarks/input_pipeline.py`), {datetime.date.today().isoformat()}",
            "",
            f"Machine: {_machine()} ({cores} usable); load average at the end {load[0]:.1f} / {load[1]:.1f} / "
            f"{load[2]:.1f}. Generated stores: random codes, 3 crops, {args.shards} shards, writer options "
            f"`{args.shard_options}`, chunked layout {args.chunk_frames} frames per record. Batch {args.batch_size} "
            f"videos per host, {args.read_threads} read threads per worker, {args.seconds:g} s timed per row; "
            f"clips/s per core = clips/s / {cores}." + (f" {args.note}" if args.note else ""),
            "",
            "| store | layout | pipeline | workers | videos/s | clips/s | clips/s per core |",
            "|---|---|---|---|---|---|---|",
            *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.0f} |" for r in rows],
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
