"""ArrayRecord writer options and chunk length for the chunked token store, measured on a store's
own tokens (codes from a real tokenizer compress unlike random ones).

Reads every (video, variant) of --store (any layout), rewrites the tokens as chunked records
(`token_store.encode_video_records`) for each --chunk_frames x --options, and reports the bytes
on disk per stored frame, the write rate, and the time of random clip reads: --clips clips of
--span frames at uniform starts, each reading the one or two chunks that hold it (one
`ArrayRecordReader.read` call per batch of 128 clips, as the pipelines do). Also reports the
same for random codes of the same shapes. Run from the repository root:

    python -m benchmarks.store_options --store STORE --append_results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vimpac_jax.constants import NUM_CODES
from vimpac_jax.data import token_store


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True, help="a token store with codes from a real tokenizer")
    p.add_argument("--chunk_frames", default="8,16,32")
    p.add_argument("--options", default="group_size:1;group_size:1,uncompressed;group_size:1,snappy;"
                                        "group_size:1,brotli:6;group_size:4", help="';'-separated writer options")
    p.add_argument("--span", type=int, default=5, help="stored frames a clip spans (T x step)")
    p.add_argument("--clips", type=int, default=20000)
    p.add_argument("--repeat_frames", type=int, default=0,
                   help="tile each video's frames to at least this many (longer videos from short ones)")
    p.add_argument("--append_results")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    args.chunk_frames = [int(c) for c in args.chunk_frames.split(",")]
    args.options = args.options.split(";")
    return args


def _measure(videos, chunk: int, options: str, span: int, clips: int, tmp: Path) -> tuple[float, float, float]:
    """(bytes per frame on disk, frames/s written, µs per clip read)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp / "probe.array_record"
    t0 = time.perf_counter()
    writer = ArrayRecordWriter(str(path), options)
    firsts, frames = [], []
    pos = 0
    for tokens in videos:
        records = token_store.encode_video_records(tokens, video_id="v", label=None, fps=2.0, variant="x",
                                                   chunk_frames=chunk)
        for r in records:
            writer.write(r)
        firsts.append(pos + 1)
        frames.append(len(tokens))
        pos += len(records)
    writer.close()
    write_s = time.perf_counter() - t0
    total = sum(frames)
    size = path.stat().st_size
    reader = token_store.RecordReader([str(path)])
    rng = np.random.default_rng(0)
    v = rng.integers(0, len(videos), clips)
    n = np.asarray(frames)[v]
    starts = (rng.random(clips) * np.maximum(n - span + 1, 1)).astype(np.int64)
    first_chunk = np.asarray(firsts)[v] + starts // chunk
    last_chunk = np.asarray(firsts)[v] + (np.minimum(starts + span, n) - 1) // chunk
    t0 = time.perf_counter()
    for lo in range(0, clips, 128):
        keys = np.unique(np.concatenate([first_chunk[lo:lo + 128], last_chunk[lo:lo + 128]]))
        for r in reader.read(keys):
            np.frombuffer(r, "<i2")
    read_s = time.perf_counter() - t0
    path.unlink()
    return size / total, total / write_s, read_s / clips * 1e6


def main(argv=None) -> int:
    args = _parse(argv)
    real = [rec["tokens"] for rec in token_store.iter_videos(args.store)]
    if args.repeat_frames:
        real = [np.concatenate([t] * -(-args.repeat_frames // len(t))) for t in real]
    rng = np.random.default_rng(0)
    codes = int(max(t.max() for t in real)) + 1
    rand = [rng.integers(0, NUM_CODES, t.shape, dtype=np.int16) for t in real]
    grid = real[0].shape[1:]
    raw = 2 * int(np.prod(grid))
    rows = []
    with tempfile.TemporaryDirectory(prefix="vimpac-options-") as tmp:
        for chunk in args.chunk_frames:
            for options in args.options:
                for kind, videos in (("real", real), ("random", rand)):
                    b, w, r = _measure(videos, chunk, options, args.span, args.clips, Path(tmp))
                    rows.append((chunk, options, kind, b, w, r))
                    print(f"C={chunk:3d} {options:32s} {kind:6s} {b:7.1f} B/frame ({b / raw:5.2f} of raw) "
                          f"write {w:9.0f} frames/s  read {r:6.1f} us/clip", flush=True)
    if args.append_results:
        load = os.getloadavg()
        lines = ["", f"## Token store options (`benchmarks/store_options.py`), {datetime.date.today().isoformat()}",
                 "", f"Store `{args.store}`: {len(real)} videos, {sum(len(t) for t in real)} frames of {grid[0]}x"
                 f"{grid[1]} codes (codes used < {codes}); random = uniform codes in [0, {NUM_CODES}) of the same "
                 f"shapes. Clip span {args.span} frames, {args.clips} random clips. {os.cpu_count()} CPUs, load "
                 f"average at the end {load[0]:.1f}." + (f" {args.note}" if args.note else ""), "",
                 "| chunk frames | writer options | codes | bytes/frame | of raw | write frames/s | read µs/clip |",
                 "|---|---|---|---|---|---|---|",
                 *[f"| {c} | `{o}` | {k} | {b:.0f} | {b / raw:.2f} | {w:.0f} | {r:.1f} |" for c, o, k, b, w, r in rows],
                 ""]
        with open(args.append_results, "a") as f:
            f.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
