"""Video decode throughput of `vimpac tokenize`'s CPU side: PyAV frames/s per core.

Writes --videos generated H.264 clips (--width x --height at --source_fps, --seconds long:
moving, textured content, libx264 at its default CRF so the bit rate is a web video's, not a
lossless one's), then decodes them as `vimpac tokenize` does (`video_decode.decode_variants` at
--fps into the 'pretrain' variant at --size) three ways:

  threads-1     one process, one decoder thread
  threads-auto  one process, libav's frame + slice threads (thread_count 0: one per core)
  processes     `decode_many` with one process per core, one decoder thread each (tokenize's way)

and reports per way the decoded (source) frames/s, the sampled output frames/s, and both per
core used. Decoding costs per *source* frame (every frame of an H.264 stream is decoded to
sample 2 of 30 per second), so the output rate scales with fps / source_fps. Run from the
repository root: `python -m benchmarks.decode --append_results benchmarks/RESULTS.md`.
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

from vimpac_jax.data import video_decode as vd


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each generated video")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--source_fps", type=int, default=30)
    p.add_argument("--fps", type=float, default=2.0, help="sampled frames per second (tokenize --fps)")
    p.add_argument("--size", type=int, default=128, help="crop size (tokenize --size)")
    p.add_argument("--ways", default="threads-1,threads-auto,processes")
    p.add_argument("--append_results", help="append a markdown section with the numbers to this file")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    args.ways = args.ways.split(",")
    if set(args.ways) - {"threads-1", "threads-auto", "processes"}:
        p.error("--ways takes threads-1, threads-auto, processes")
    if min(args.videos, args.width, args.height, args.source_fps) < 1 or args.width % 2 or args.height % 2:
        p.error("--videos, --width, --height, --source_fps must be >= 1 (width, height even)")
    return args


def write_video(path: Path, *, seconds: float, width: int, height: int, rate: int, seed: int) -> int:
    """A moving textured scene (smooth noise panned and zoomed) as H.264; returns its frames."""
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), np.uint8)
    texture = np.kron(base, np.ones((8, 8, 1), np.uint8)).astype(np.float32)  # blocky, then blurred
    texture = (texture + np.roll(texture, 3, 0) + np.roll(texture, 3, 1) + np.roll(texture, 5, (0, 1))) / 4
    n = int(seconds * rate)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            dy, dx = int(4 * i) % 16, int(2 * i) % 16
            frame = np.roll(texture, (dy, dx), (0, 1))[:height, :width]
            frame = np.clip(frame + 20 * np.sin(i / 10), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return n


def main(argv=None) -> int:
    args = _parse(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    variants = vd.variants_for("pretrain", args.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vimpac-decode-") as tmp:
        paths = [Path(tmp) / f"v{i}.mp4" for i in range(args.videos)]
        source_frames = sum(write_video(p, seconds=args.seconds, width=args.width, height=args.height,
                                        rate=args.source_fps, seed=i) for i, p in enumerate(paths))
        mb = sum(p.stat().st_size for p in paths) / 2 ** 20
        print(f"wrote {args.videos} videos, {source_frames} frames, {mb:.1f} MB", flush=True)
        for way in args.ways:
            t0 = time.perf_counter()
            out = 0
            if way == "processes":
                used = cores
                for _, _, result in vd.decode_many([str(p) for p in paths], args.fps, variants, cores, threads=1):
                    if isinstance(result, vd.VideoDecodeError):
                        raise result
                    out += len(result[variants[0].name])
            else:
                threads = 1 if way == "threads-1" else 0
                used = 1 if threads == 1 else cores
                for p in paths:
                    out += len(vd.decode_variants(p, args.fps, variants, threads=threads)[variants[0].name])
            dt = time.perf_counter() - t0
            rows.append((way, used, source_frames / dt, out / dt))
            r = rows[-1]
            print(f"{way:13s} cores={used}  {r[2]:8.0f} source frames/s ({r[2] / used:7.0f}/core)  "
                  f"{r[3]:7.1f} output frames/s ({r[3] / used:6.1f}/core)  load {os.getloadavg()[0]:.1f}", flush=True)
    if args.append_results:
        load = os.getloadavg()
        lines = ["", f"## Video decode (`benchmarks/decode.py`), {datetime.date.today().isoformat()}", "",
                 f"{cores} usable CPUs; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}. "
                 f"{args.videos} generated H.264 videos, {args.width}x{args.height} at {args.source_fps} fps, "
                 f"{args.seconds:g} s each ({mb:.1f} MB); decoded at {args.fps:g} fps into a {args.size} px crop."
                 + (f" {args.note}" if args.note else ""), "",
                 "| way | cores used | source frames/s | per core | output frames/s | per core |",
                 "|---|---|---|---|---|---|",
                 *[f"| {w} | {u} | {s:.0f} | {s / u:.0f} | {o:.1f} | {o / u:.1f} |" for w, u, s, o in rows], ""]
        with open(args.append_results, "a") as f:
            f.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
