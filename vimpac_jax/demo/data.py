"""A generated video dataset where one frame cannot tell the class: `vimpac demo-data`.

The built-in stand-in for the temporally-heavy sets (SSV2, Diving48) that VIMPAC is strongest
on. Each video shows one object on a textured, noisy background, plus (sometimes) static
distractor objects, and the class is the target's motion:

    0 move_left   1 move_right   2 move_up      3 move_down
    4 rotate_cw   5 rotate_ccw   6 grow         7 shrink      (grow = approach, shrink = recede)

Shape (circle, square, triangle, cross, each with a coloured marker so that rotation shows),
colours, size, speed, position, orientation, background and distractors are random per video.

Why one frame cannot tell the class. Motion is parametrised symmetrically around the middle of
the clip: with normalised time t in [-1/2, 1/2] (first to last frame),

    centre(t) = centre_mid + displacement * t,  angle(t) = angle_mid + rotation * t,
    radius(t) = radius_mid * exp(log_scale * t),

and the sampler draws (centre_mid, radius_mid, angle_mid) from distributions that do not depend
on the sign of (displacement, rotation, log_scale), which alone picks the class within each pair.
So reversing time maps a video of one class to an equally likely video of its opposite
(`reverse_spec`; `render_video(reverse_spec(s))` == `render_video(s)[::-1]` without noise),
and therefore each frame, and the unordered set of frames, has the same distribution under both
classes of a pair: only the temporal order tells them apart. Motion is uniform, so any temporal
crop of a video carries its label.

Layout written by `write_demo_dataset(out_dir)` (all paths in the list files are relative to
``out_dir``; read them with ``annotations.read_mmaction_list(list_file, video_root=out_dir)``,
or pass ``--video-root out_dir`` to `vimpac tokenize`):

    videos/{pool,train,val}/<split>_<index>.mp4   H.264 (libx264, yuv420p) through PyAV
    pool.txt                  'path' per line: the unlabelled pre-training pool
    train.txt, val.txt        'path label' per line (mmaction2 video lists), class-balanced
    classes.txt               class names in label order (annotations.read_label_map)
    specs.jsonl               every video's generating spec (analysis only: the pool's labels
                              are in it, and nothing in the training chain reads it)
    dataset.json, README.txt  counts, fps, size, seed, classes, codec

The pool, train and val videos are drawn independently (different seeds) from the same
distribution; file names carry no label. Left/right and cw/ccw classes flip with a mirror, so
fine-tune with the 'finetune_noflip' variant set, as for SSV2.

Pure numpy drawing (no PIL / OpenCV); PyAV only for encoding. Like `video_decode`, this module
must stay importable without JAX: generation runs in spawned worker processes.
"""

from __future__ import annotations

import colorsys
import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vimpac_jax import io_utils
from vimpac_jax.progress import Progress

__all__ = [
    "CLASS_NAMES", "OPPOSITE", "SHAPES", "SPLITS", "PRESETS", "DemoPreset", "ObjectSpec", "VideoSpec",
    "sample_spec", "reverse_spec", "render_video", "encode_video", "spec_to_dict", "spec_from_dict",
    "write_demo_dataset", "dataset_counts",
]

CLASS_NAMES = ("move_left", "move_right", "move_up", "move_down", "rotate_cw", "rotate_ccw", "grow", "shrink")
# Each class's time-reversed twin.
OPPOSITE = (1, 0, 3, 2, 5, 4, 7, 6)
SHAPES = ("circle", "square", "triangle", "cross")
SPLITS = ("pool", "train", "val")
_SPLIT_CODE = {"pool": 0, "train": 1, "val": 2}
FORMAT_VERSION = 1

# Sampling ranges, in units of the frame side (the frame spans [-1/2, 1/2] on both axes, +y down).
_RADIUS = (0.14, 0.20)  # target radius for move classes
# Rotating targets are drawn larger, so that their marker spans a few pixels even at 48 px.
_RADIUS_ROTATE = (0.22, 0.30)
_RADIUS_SCALED = (0.10, 0.14)  # radius at mid-clip for grow / shrink
# A clip of half the video then moves by about two tokens at 48 px and 8x down-sampling.
_DISPLACEMENT = (0.45, 0.65)  # distance travelled over the clip
_ROTATION = (0.6 * math.pi, 1.6 * math.pi)  # radians turned over the clip
_LOG_SCALE = (math.log(2.0), math.log(2.8))  # |log(last radius / first radius)|
_EDGE = 0.02  # margin between a fully-inside object and the frame edge
# Largest |p| of any shape in object-unit coordinates (the square's corner: 0.8 * sqrt(2)).
_SHAPE_EXTENT = 1.14


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One object. Geometry is in units of the frame side, (0, 0) = frame centre, +y down;
    values are at mid-clip, changes are over the whole clip (first to last frame).

    angle > 0 turns clockwise on screen; at angle 0 the marker points up.
    """

    shape: str
    colour: tuple[float, float, float]  # RGB in [0, 1]
    marker_colour: tuple[float, float, float]
    centre: tuple[float, float]  # (x, y)
    radius: float
    angle: float = 0.0  # radians
    displacement: tuple[float, float] = (0.0, 0.0)  # (dx, dy) over the clip
    rotation: float = 0.0  # radians over the clip; > 0 = clockwise
    log_scale: float = 0.0  # log(radius at last frame / radius at first frame)


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """Everything that determines one video's frames (with the frame size and count)."""

    label: int
    target: ObjectSpec
    distractors: tuple[ObjectSpec, ...]
    background: tuple[float, float, float]  # RGB in [0, 1]
    # Static luminance texture: (cycles_x, cycles_y, phase, amplitude) sinusoids.
    texture: tuple[tuple[float, float, float, float], ...]
    noise_std: float  # per-pixel, per-frame Gaussian noise, in [0, 1] units
    noise_seed: int


@dataclasses.dataclass(frozen=True)
class DemoPreset:
    """Size and difficulty of a generated dataset.

    A video has ``num_frames`` frames at ``fps`` (so lasts num_frames / fps seconds). Counts are
    videos per split; train and val are class-balanced (exactly, when divisible by the number
    of classes).
    """

    size: int
    fps: int
    num_frames: int
    pool: int
    train: int
    val: int
    max_distractors: int = 1
    noise_std: float = 0.03
    texture_amplitude: float = 0.08
    crf: int = 20

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps


PRESETS: dict[str, DemoPreset] = {
    # CPU demo: 48 px (a 6x6 token grid at 8x down-sampling), 3 s at 8 fps. Decoded at 2 fps a
    # video is 6 frames. 75 pool videos, 60 train and 20 val videos per class. Plain backgrounds,
    # faint noise, no distractors: at 6x6 tokens a textured background's codes vary more than
    # the moving object's, and 480 labelled videos cannot teach a model to ignore that.
    "default": DemoPreset(size=48, fps=8, num_frames=24, pool=600, train=480, val=160, max_distractors=0,
                          noise_std=0.01, texture_amplitude=0.0),
    # Accelerator / longer CPU budget: 64 px (8x8 tokens), 4 s at 8 fps, a pool of 4000; a larger
    # val split, so that comparisons between runs are less noisy. Some texture and a distractor.
    "full": DemoPreset(size=64, fps=8, num_frames=32, pool=4000, train=400, val=400, max_distractors=1,
                       noise_std=0.01, texture_amplitude=0.03),
    # The test suite's check of the whole chain: seconds, not a learnable amount of data.
    "smoke": DemoPreset(size=16, fps=8, num_frames=16, pool=16, train=16, val=8, max_distractors=0),
}


def spec_to_dict(spec: VideoSpec) -> dict[str, Any]:
    """A JSON-ready dict (tuples become lists); `spec_from_dict` inverts it."""
    return dataclasses.asdict(spec)


def spec_from_dict(d: Mapping[str, Any]) -> VideoSpec:
    def obj(o: Mapping[str, Any]) -> ObjectSpec:
        return ObjectSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in o.items()})

    return VideoSpec(
        label=int(d["label"]), target=obj(d["target"]), distractors=tuple(obj(o) for o in d["distractors"]),
        background=tuple(d["background"]), texture=tuple(tuple(c) for c in d["texture"]),
        noise_std=float(d["noise_std"]), noise_seed=int(d["noise_seed"]))


def reverse_spec(spec: VideoSpec) -> VideoSpec:
    """The same video played backwards: the opposite class (`OPPOSITE`).

    Exact for the noise-free frames: render_video(reverse_spec(s)) == render_video(s)[::-1]
    when s.noise_std == 0 (the noise is i.i.d. per frame, so its order carries nothing).
    """
    t = spec.target
    target = dataclasses.replace(t, displacement=(-t.displacement[0], -t.displacement[1]),
                                 rotation=-t.rotation, log_scale=-t.log_scale)
    return dataclasses.replace(spec, label=OPPOSITE[spec.label], target=target)


def _luma(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _sample_colours(rng: np.random.Generator, background: tuple[float, float, float]):
    """(colour, marker colour): a saturated colour that stands out from the background, and a
    marker (black, white or the colour's complement) that stands out from both, so that the
    object's orientation shows even at 32 px."""
    bg = np.asarray(background)
    for _ in range(100):
        colour = np.asarray(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0)))
        if np.linalg.norm(colour - bg) >= 0.45 and abs(_luma(colour) - _luma(bg)) >= 0.12:
            break
    else:  # practically unreachable; keeps sampling total
        colour = 1.0 - bg
    candidates = [np.zeros(3), np.ones(3), 1.0 - colour]
    marker = max(candidates, key=lambda m: min(np.linalg.norm(m - colour), np.linalg.norm(m - bg)))
    return tuple(float(c) for c in colour), tuple(float(c) for c in marker)


def _sample_object(rng: np.random.Generator, background, radius: float, centre) -> ObjectSpec:
    colour, marker = _sample_colours(rng, background)
    return ObjectSpec(shape=SHAPES[rng.integers(len(SHAPES))], colour=colour, marker_colour=marker,
                      centre=(float(centre[0]), float(centre[1])), radius=float(radius),
                      angle=float(rng.uniform(0, 2 * math.pi)))


def _sample_background(rng: np.random.Generator, texture_amplitude: float):
    """(base RGB, texture components): a muted colour, dark or light, and a few static
    low-frequency luminance waves."""
    value = rng.uniform(0.1, 0.35) if rng.uniform() < 0.5 else rng.uniform(0.6, 0.85)
    base = tuple(float(c) for c in colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.5), value))
    k = 3
    texture = tuple(
        (float(rng.integers(1, 5) * rng.choice([-1, 1])), float(rng.integers(0, 5)),
         float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.5, 1.0) * texture_amplitude / k))
        for _ in range(k))
    return base, texture


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from point p to the segment [a, b] (2-vectors)."""
    ab = b - a
    denom = float(ab @ ab)
    t = 0.0 if denom == 0 else min(1.0, max(0.0, float((p - a) @ ab) / denom))
    return float(np.hypot(*(p - (a + t * ab))))


def sample_spec(
    rng: np.random.Generator,
    label: int,
    *,
    max_distractors: int = 1,
    noise_std: float = 0.03,
    texture_amplitude: float = 0.08,
) -> VideoSpec:
    """Draw a random video of class ``label`` (an index into `CLASS_NAMES`).

    Everything but the sign of the target's motion is drawn independently of which class of its
    opposite pair is asked for (see the module docstring), so the pair differs only in time order.
    """
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label must be in [0, {len(CLASS_NAMES)}), got {label}")
    if max_distractors < 0:
        raise ValueError(f"max_distractors must be >= 0, got {max_distractors}")
    background, texture = _sample_background(rng, texture_amplitude)
    name = CLASS_NAMES[label]
    sign = -1.0 if name in ("move_left", "move_up", "rotate_ccw", "shrink") else 1.0
    displacement, rotation, log_scale = (0.0, 0.0), 0.0, 0.0
    if name.startswith("move"):
        radius = rng.uniform(*_RADIUS)
        dist = rng.uniform(*_DISPLACEMENT)
        # Along the motion the object may leave the frame by up to 40% of its size at the ends.
        along = rng.uniform(-1, 1) * max(0.0, 0.5 - dist / 2 - 0.6 * radius)
        across = rng.uniform(-1, 1) * (0.5 - radius - _EDGE)
        horizontal = name in ("move_left", "move_right")
        centre = (along, across) if horizontal else (across, along)
        displacement = (sign * dist, 0.0) if horizontal else (0.0, sign * dist)
    elif name.startswith("rotate"):
        radius = rng.uniform(*_RADIUS_ROTATE)
        centre = rng.uniform(-1, 1, size=2) * (0.5 - radius - _EDGE)
        rotation = sign * rng.uniform(*_ROTATION)
    else:  # grow / shrink
        radius = rng.uniform(*_RADIUS_SCALED)
        log_scale = sign * rng.uniform(*_LOG_SCALE)
        largest = radius * math.exp(abs(log_scale) / 2)
        centre = rng.uniform(-1, 1, size=2) * max(0.0, 0.5 - 0.9 * largest)
    target = dataclasses.replace(_sample_object(rng, background, radius, centre),
                                 displacement=displacement, rotation=float(rotation), log_scale=float(log_scale))
    distractors: list[ObjectSpec] = []
    # Placed clear of the target's whole path (and of each other), so that the target is never
    # hidden; the path, as a set, is the same played backwards, so this keeps the pair symmetry.
    path = (np.asarray(centre) - np.asarray(displacement) / 2, np.asarray(centre) + np.asarray(displacement) / 2)
    reach = radius * math.exp(abs(log_scale) / 2) * _SHAPE_EXTENT
    for _ in range(int(rng.integers(0, max_distractors + 1))):
        r = rng.uniform(*_RADIUS)
        for _try in range(20):
            c = rng.uniform(-1, 1, size=2) * (0.5 - r - _EDGE)
            if _segment_distance(c, *path) > reach + r * _SHAPE_EXTENT and all(
                    np.hypot(*(c - np.asarray(d.centre))) > (r + d.radius) * _SHAPE_EXTENT for d in distractors):
                distractors.append(_sample_object(rng, background, r, c))
                break
    return VideoSpec(label=int(label), target=target, distractors=tuple(distractors), background=background,
                     texture=texture, noise_std=float(noise_std), noise_seed=int(rng.integers(2**63)))


# ----------------------------------------------------------------------------------------------
# Drawing: pure numpy, all frames at once
# ----------------------------------------------------------------------------------------------

# Triangle edge normals (screen coords, +y down): apex up at angle 0; inside <=> p . n <= 1/2.
_TRIANGLE_NORMALS = np.array([[math.cos(a), math.sin(a)] for a in np.deg2rad([90.0, 210.0, 330.0])])
_MARKER_CENTRE_Y, _MARKER_RADIUS = -0.5, 0.35  # in the object's unit frame, towards its top


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of points (object-unit coordinates, radius 1) inside ``shape``."""
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.8
    if shape == "triangle":
        n = _TRIANGLE_NORMALS
        return ((x * n[0, 0] + y * n[0, 1] <= 0.5) & (x * n[1, 0] + y * n[1, 1] <= 0.5)
                & (x * n[2, 0] + y * n[2, 1] <= 0.5))
    if shape == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= 0.33) & (ay <= 0.95)) | ((ay <= 0.33) & (ax <= 0.95))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _clip_times(num_frames: int) -> np.ndarray:
    """Normalised times [N] in [-1/2, 1/2], symmetric, so frame i of a video is frame N-1-i of
    its reverse."""
    if num_frames == 1:
        return np.zeros(1)
    return np.arange(num_frames) / (num_frames - 1) - 0.5


def _draw_object(canvas: np.ndarray, obj: ObjectSpec, times: np.ndarray, ss: int) -> None:
    """Composite ``obj`` onto the float canvas [N, S, S, 3] in place, anti-aliased by
    ``ss`` x ``ss`` supersampling.

    Only a window around the object is evaluated in each frame (one window size for all
    frames, placed per frame), which keeps drawing cheap next to encoding.
    """
    n, size = canvas.shape[0], canvas.shape[1]
    cx = obj.centre[0] + obj.displacement[0] * times  # [N], frame units
    cy = obj.centre[1] + obj.displacement[1] * times
    r = obj.radius * np.exp(obj.log_scale * times)
    theta = obj.angle + obj.rotation * times
    win = int(math.ceil(2 * _SHAPE_EXTENT * r.max() * size)) + 2  # pixels
    x0 = np.floor((cx + 0.5) * size - win / 2).astype(int)  # window's first pixel, per frame
    y0 = np.floor((cy + 0.5) * size - win / 2).astype(int)
    sub = (np.arange(win * ss) + 0.5) / ss  # sub-sample offsets inside the window, pixels
    gx = (x0[:, None] + sub[None, :]) / size - 0.5  # [N, win*ss], frame units
    gy = (y0[:, None] + sub[None, :]) / size - 0.5
    # float32 from here: the [N, win*ss, win*ss] arrays dominate the cost.
    cos = (np.cos(theta) / r).astype(np.float32)[:, None, None]
    sin = (np.sin(theta) / r).astype(np.float32)[:, None, None]
    dx = (gx - cx[:, None]).astype(np.float32)[:, None, :]  # [N, 1, win*ss]
    dy = (gy - cy[:, None]).astype(np.float32)[:, :, None]  # [N, win*ss, 1]
    # Screen p = c + r R(theta) p_local with R turning clockwise on screen (+y is down), so
    # p_local = R(-theta) (p - c) / r.
    x = cos * dx + sin * dy  # [N, win*ss, win*ss]
    y = -sin * dx + cos * dy
    body = _inside(obj.shape, x, y)
    marker = body & (x * x + (y - _MARKER_CENTRE_Y) ** 2 <= _MARKER_RADIUS**2)

    def coverage(mask: np.ndarray) -> np.ndarray:  # [N, win*ss, win*ss] -> [N, win, win, 1]
        counts = mask.reshape(n, win, ss, win, ss).sum(axis=(2, 4), dtype=np.int32)
        return (counts / float(ss * ss))[..., None]

    a_body, a_marker = coverage(body & ~marker), coverage(marker)
    colour, marker_colour = np.asarray(obj.colour), np.asarray(obj.marker_colour)
    for i in range(n):  # paste each frame's window, clipped to the frame
        ys, xs = slice(max(y0[i], 0), min(y0[i] + win, size)), slice(max(x0[i], 0), min(x0[i] + win, size))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue  # entirely outside the frame
        wy = slice(ys.start - y0[i], ys.stop - y0[i])
        wx = slice(xs.start - x0[i], xs.stop - x0[i])
        ab, am = a_body[i, wy, wx], a_marker[i, wy, wx]
        region = canvas[i, ys, xs]
        region *= 1.0 - ab - am
        region += ab * colour + am * marker_colour


def _background(spec: VideoSpec, size: int) -> np.ndarray:
    """Static background [size, size, 3] in [0, 1]: base colour plus luminance waves."""
    g = (np.arange(size) + 0.5) / size
    tex = np.zeros((size, size))
    for fx, fy, phase, amp in spec.texture:
        tex += amp * np.sin(2 * math.pi * (fx * g[None, :] + fy * g[:, None]) + phase)
    return np.asarray(spec.background)[None, None, :] + tex[..., None]


def render_video(spec: VideoSpec, size: int, num_frames: int, supersample: int | None = None) -> np.ndarray:
    """Draw ``spec`` as uint8 frames [num_frames, size, size, 3] (RGB).

    Frame i is at normalised time i / (num_frames - 1) - 1/2, so the motion spans the clip
    whatever its length. ``supersample``: sub-samples per pixel side for anti-aliasing (default
    4 up to 48 px, else 2). Deterministic: the noise comes from ``spec.noise_seed``.
    """
    if size < 2 or num_frames < 1:
        raise ValueError(f"need size >= 2 and num_frames >= 1, got size={size} num_frames={num_frames}")
    ss = supersample or (4 if size <= 48 else 2)
    times = _clip_times(num_frames)
    canvas = np.broadcast_to(_background(spec, size), (num_frames, size, size, 3)).copy()
    for obj in spec.distractors:  # static, under the target
        _draw_object(canvas, obj, times, ss)
    _draw_object(canvas, spec.target, times, ss)
    if spec.noise_std > 0:
        rng = np.random.default_rng(spec.noise_seed)
        canvas += spec.noise_std * rng.standard_normal(size=canvas.shape, dtype=np.float32)
    return np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


def encode_video(path: str | os.PathLike, frames: np.ndarray, fps: int, crf: int = 20) -> int:
    """Write uint8 frames [N, H, W, 3] (even H, W) as H.264 (yuv420p) in an mp4; returns bytes.

    Deterministic: the same frames give the same bytes with the same libx264 build, on any
    machine. That takes one encoder thread (generation parallelises over processes instead) and
    x264's portable C code (``asm=0``): its AVX-512 routines, on this tiny frame size, made the
    output depend on the process's allocation history (measured: the same frames encoded to
    different bytes in a fresh and in a busy process), and the SIMD paths do not all match the
    C code bit for bit, so bytes would also differ between CPUs. It costs about 1.5x (32 px) to
    2.5x (64 px) encoding time. Keyframe every second; B-frames as x264 chooses, as in real files.
    """
    import av  # noqa: PLC0415 - optional dependency, imported lazily on purpose

    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs an even frame size, got {h}x{w}")
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "g": str(fps), "x264-params": "asm=0"}
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = i  # in 1/fps units: frame i is shown at i / fps
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return os.path.getsize(path)


def _make_videos(jobs: Sequence[tuple[str, VideoSpec]], root: str, size: int, num_frames: int, fps: int,
                 crf: int) -> int:
    """Worker: render and encode each (relative path, spec) under ``root``; returns bytes written."""
    total = 0
    for rel, spec in jobs:
        total += encode_video(os.path.join(root, rel), render_video(spec, size, num_frames), fps, crf)
    return total


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------


def dataset_counts(preset: DemoPreset, counts: Mapping[str, int] | None = None) -> dict[str, int]:
    """Videos per split: the preset's, with ``counts`` overriding some splits."""
    out = {"pool": preset.pool, "train": preset.train, "val": preset.val}
    for split, n in (counts or {}).items():
        if split not in out:
            raise ValueError(f"counts: unknown split {split!r}; splits are {SPLITS}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"counts[{split!r}] must be a non-negative integer, got {n!r}")
        out[split] = int(n)
    if out["train"] + out["val"] == 0 and out["pool"] == 0:
        raise ValueError("counts: every split is empty")
    return out


def _split_labels(seed: int, split: str, n: int) -> np.ndarray:
    """Balanced labels [n]: each run of len(CLASS_NAMES) videos holds every class once, in a
    seeded random order (so file order says nothing of the class). Block b depends only on
    (seed, split, b), so a larger count extends a split without relabelling its first videos."""
    k = len(CLASS_NAMES)
    blocks = [np.random.default_rng([seed, _SPLIT_CODE[split], 1_000_003, b]).permutation(k)
              for b in range(-(-n // k))]
    return np.concatenate(blocks)[:n] if blocks else np.zeros(0, np.int64)


def _split_specs(preset: DemoPreset, seed: int, split: str, n: int) -> list[tuple[str, VideoSpec]]:
    """[(relative path, spec)] for one split. Video i depends only on (seed, split, i), so a
    larger count extends a split without changing its first videos' content."""
    labels = _split_labels(seed, split, n)
    out = []
    for i, label in enumerate(labels):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
        spec = sample_spec(rng, int(label), max_distractors=preset.max_distractors, noise_std=preset.noise_std,
                           texture_amplitude=preset.texture_amplitude)
        out.append((f"videos/{split}/{split}_{i:05d}.mp4", spec))
    return out


def _resolve_preset(preset: str | DemoPreset) -> tuple[str, DemoPreset]:
    if isinstance(preset, DemoPreset):
        p, name = preset, "custom"
    elif preset in PRESETS:
        p, name = PRESETS[preset], preset
    else:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    if p.size < 8 or p.size % 2:
        raise ValueError(f"preset size must be even and >= 8 (yuv420p), got {p.size}")
    if p.fps < 1 or p.num_frames < 2:
        raise ValueError(f"preset needs fps >= 1 and num_frames >= 2, got fps={p.fps} num_frames={p.num_frames}")
    return name, p


def _check_out(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise FileExistsError(f"--out {out} exists and is not empty; pass --force to replace it")


def _remove_stale_partials(out: Path) -> None:
    """Remove '.<name>.partial-<pid>' folders left by killed runs (their pid is gone)."""
    prefix = f".{out.name}.partial-"
    for p in out.parent.glob(prefix + "*"):
        pid = p.name[len(prefix):]
        if pid.isdigit() and not io_utils.pid_alive(int(pid)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _run_jobs(jobs: list[tuple[str, VideoSpec]], root: str, preset: DemoPreset, workers: int,
              report: Callable[[int], None]) -> int:
    """Render + encode every job; calls ``report(videos_done)``; returns total bytes."""
    args = (root, preset.size, preset.num_frames, preset.fps, preset.crf)
    chunk = 8
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    total = done = 0
    if workers <= 0 or len(chunks) <= 2:
        for c in chunks:
            total += _make_videos(c, *args)
            done += len(c)
            report(done)
        return total
    # 'spawn', never 'fork': the caller may hold JAX's threads (the demo runs in one process).
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
        futures = {pool.submit(_make_videos, c, *args): len(c) for c in chunks}
        try:
            for fut in cf.as_completed(futures):
                total += fut.result()
                done += futures[fut]
                report(done)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return total


def _verify(root: Path, rel_paths: Sequence[str], preset: DemoPreset) -> None:
    """Decode a few written files with the project's decoder: catches a broken encoder setup
    before anything downstream trusts the dataset."""
    from vimpac_jax.data.video_decode import decode_frames  # noqa: PLC0415 - av imported lazily

    expected = (preset.num_frames, preset.size, preset.size, 3)
    for rel in rel_paths:
        frames = decode_frames(root / rel, preset.fps)
        if frames.shape != expected:
            raise RuntimeError(f"{rel}: decoded {frames.shape}, expected {expected}: the encoder setup is broken")


def _readme(meta: dict[str, Any]) -> str:
    c = meta["counts"]
    lines = [
        "vimpac demo dataset: generated motion videos where one frame cannot tell the class.",
        "",
        f"Written by `vimpac demo-data` (vimpac_jax/demo/data.py), preset {meta['preset']!r}, "
        f"seed {meta['seed']}.",
        f"{meta['size']}x{meta['size']} px, {meta['num_frames']} frames at {meta['fps']} fps "
        f"({meta['seconds']:g} s), H.264 mp4.",
        f"pool: {c['pool']} unlabelled videos (pool.txt), train: {c['train']} (train.txt), "
        f"val: {c['val']} (val.txt), {len(meta['classes'])} classes (classes.txt).",
        "",
        "Paths in the list files are relative to this directory: pass it as --video-root",
        "(or annotations.read_mmaction_list(list, video_root=this_dir)).",
        "Left/right and cw/ccw swap under a mirror: fine-tune with the 'finetune_noflip' variants.",
        "specs.jsonl holds every video's generating parameters (pool labels included): for",
        "analysis only, never an input to training.",
        "",
        "classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(meta["classes"])),
    ]
    return "\n".join(lines) + "\n"


def _write_list(path: Path, entries: Sequence[tuple[str, VideoSpec]], labelled: bool) -> None:
    path.write_text("".join(f"{rel} {spec.label}\n" if labelled else f"{rel}\n" for rel, spec in entries))


def write_demo_dataset(
    out_dir: str | os.PathLike,
    preset: str | DemoPreset = "default",
    seed: int = 0,
    workers: int | None = None,
    *,
    counts: Mapping[str, int] | None = None,
    force: bool = False,
    progress: bool = True,
    progress_interval: float = 2.0,
) -> dict[str, Any]:
    """Generate the dataset into ``out_dir`` (layout in the module docstring); returns a summary.

    Args:
      preset: a `PRESETS` name ('default': small, for the CPU demo; 'full') or a `DemoPreset`.
      seed: everything (specs, noise, label order) follows from it; the same seed and library
        versions give byte-identical files, whatever ``workers`` is.
      workers: processes rendering and encoding (default: the usable cores; 0 = this process).
      counts: override the preset's videos per split, e.g. {'pool': 16, 'train': 16, 'val': 8}.
      force: replace an existing non-empty ``out_dir`` (only once the new one is complete).
      progress: log progress (videos/s, ETA; `vimpac_jax.progress`) every ``progress_interval`` seconds.

    The dataset is written to a hidden sibling folder and renamed into place at the end, so
    ``out_dir`` never holds a half-written dataset. Any failure aborts the whole run: a
    generated dataset with videos missing would no longer be balanced or reproducible.

    Returns: {'out_dir', 'preset', 'seed', 'size', 'fps', 'num_frames', 'counts',
    'label_counts', 'lists' (split -> list file), 'classes_file', 'bytes', 'seconds'}.
    """
    t_start = time.monotonic()
    name, p = _resolve_preset(preset)
    n = dataset_counts(p, counts)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    workers = _default_workers() if workers is None else int(workers)
    out = Path(out_dir).absolute()
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)

    entries = {split: _split_specs(p, int(seed), split, n[split]) for split in SPLITS}
    jobs = [e for split in SPLITS for e in entries[split]]
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for split in SPLITS:
            (tmp / "videos" / split).mkdir(parents=True)
        line = Progress(len(jobs), label="demo-data: ", unit="videos", every_seconds=progress_interval,
                        enabled=progress)

        def report(done: int) -> None:
            line.update(done, force=done == len(jobs))

        total_bytes = _run_jobs(jobs, str(tmp), p, workers, report)
        _verify(tmp, [entries[s][0][0] for s in SPLITS if entries[s]], p)

        _write_list(tmp / "pool.txt", entries["pool"], labelled=False)
        _write_list(tmp / "train.txt", entries["train"], labelled=True)
        _write_list(tmp / "val.txt", entries["val"], labelled=True)
        (tmp / "classes.txt").write_text("".join(c + "\n" for c in CLASS_NAMES))
        with open(tmp / "specs.jsonl", "w") as f:
            for split in SPLITS:
                for rel, spec in entries[split]:
                    f.write(json.dumps({"split": split, "path": rel, "spec": spec_to_dict(spec)}) + "\n")
        label_counts = {s: np.bincount([spec.label for _, spec in entries[s]], minlength=len(CLASS_NAMES)).tolist()
                        for s in ("train", "val")}
        import av  # noqa: PLC0415

        meta = {
            "format_version": FORMAT_VERSION, "generator": "vimpac_jax.demo.data", "preset": name,
            "preset_values": dataclasses.asdict(p), "seed": int(seed), "size": p.size, "fps": p.fps,
            "num_frames": p.num_frames, "seconds": p.seconds, "classes": list(CLASS_NAMES),
            "opposite": list(OPPOSITE), "counts": n, "label_counts": label_counts,
            # A mirror swaps left/right and cw/ccw: fine-tune with the 'finetune_noflip' variants.
            "flip_changes_label": True,
            "lists": {"pool": "pool.txt", "train": "train.txt", "val": "val.txt"},
            "paths_relative_to": "this directory (pass it as video_root / --video-root)",
            "codec": {"name": "libx264", "pix_fmt": "yuv420p", "crf": p.crf, "container": "mp4",
                      "pyav": av.__version__},
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "README.txt").write_text(_readme(meta))
        # Swap in only now; an old dataset (--force) goes only after the new one is in place.
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out_dir": str(out), "preset": name, "seed": int(seed), "size": p.size, "fps": p.fps,
        "num_frames": p.num_frames, "counts": n, "label_counts": label_counts,
        "lists": {s: str(out / f"{s}.txt") for s in SPLITS}, "classes_file": str(out / "classes.txt"),
        "bytes": total_bytes, "seconds": time.monotonic() - t_start,
    }
