"""Videos from a prepared TensorFlow Datasets (TFDS) dataset, for `vimpac tokenize --tfds`.

`vimpac tokenize --tfds NAME[/CONFIG]:SPLIT [--data-dir D]` reads decoded videos and labels from a
TFDS dataset prepared beforehand (`tfds.builder("ucf101", data_dir=D).download_and_prepare()`)
instead of video files. `TfdsVideoSource` gives the tokenize job what the file path gives it: the
list of items (video id, label) and a `decode_many` with the contract of
`video_decode.decode_many`, so the journal, resume, errors.txt, metadata.json, progress and
per-host shares of `vimpac_jax/tokenize/` work unchanged.

What is read, per example (found from the dataset's features, so other video datasets work too):
  video   the first `tfds.features.Video` feature (frames stored as JPEG/PNG images), else a
          uint8 [T, H, W, C] feature named 'video'; C = 1 (grey) is repeated to RGB.
  label   the ClassLabel feature named 'label', else the first ClassLabel (else none); its
          names go into the store's metadata as `class_names`.
  id      a text feature named 'video_id' or 'id' if there is one, else `NAME[/CONFIG]:SPLIT:i`,
          i being the example's position in the split (read in file order, never shuffled).

Frames: TFDS keeps every source frame, without timestamps, so the source frame rate comes from
--source-fps, else the dataset's metadata ('fps' / 'frame_rate'), else `KNOWN_SOURCE_FPS`; a
dataset with none of these is refused with an error naming --source-fps. Frame i is taken to
show at i / source_fps, and the output frames are picked by the same rule ('floor' or 'ffmpeg',
`video_decode.sample_slot`) that picks them from a video file's timestamps, so a T-frame clip at
25 fps sampled at 2 fps gives ceil(T * 2 / 25) frames (floor). Only the picked frames are decoded,
then resized (shorter side, libswscale bicubic: `video_decode.resize_short_side`) and cut into
the variants with `video_decode.Variant.apply`, as for files.

Reading uses TensorFlow (tf.data; CPU is enough, and its GPUs are hidden from it so that it leaves
them to JAX). Both TFDS and TensorFlow are imported only here, when --tfds is used: install them
with ``pip install 'vimpac-jax[tfds]'``.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from vimpac_jax.data import annotations
from vimpac_jax.data import video_decode as vd

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'vimpac-jax[tfds]'"
# Datasets whose frame rate TFDS does not record. UCF101: "fixed frame rate of 25 FPS" (Soomro et
# al. 2012), and TFDS's ucf101 extracts every frame with ffmpeg. --source-fps overrides.
KNOWN_SOURCE_FPS = {"ucf101": 25.0}
FPS_METADATA_KEYS = ("fps", "frame_rate")
ID_FEATURE_KEYS = ("video_id", "id")


def import_tfds(with_tf: bool = True):
    """`tensorflow_datasets`, with an install hint if missing; with_tf also imports TensorFlow
    and hides its GPUs (so that TF does not reserve accelerator memory JAX needs)."""
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 - optional dependency, lazily imported
        if with_tf:
            import tensorflow as tf  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(f"TFDS support needs tensorflow-datasets and TensorFlow (CPU is enough), which are not "
                          f"installed: {INSTALL_HINT}") from e
    if with_tf:
        try:
            tf.config.set_visible_devices([], "GPU")
        except (RuntimeError, ValueError):  # TF's devices were initialised already by someone else
            pass
    return tfds


# ---------------------------------------------------------------------------------------------
# Pure helpers


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """`NAME[/CONFIG][:VERSION]:SPLIT`; SPLIT may use TFDS slicing ('train[:10%]')."""

    builder: str  # what tfds.builder takes: 'ucf101', 'ucf101/ucf101_1', 'ucf101/ucf101_1:2.0.0'
    split: str

    @property
    def name(self) -> str:
        return self.builder.split("/")[0].split(":")[0]


def parse_spec(spec: str) -> TfdsSpec:
    """'ucf101/ucf101_1:train' -> TfdsSpec('ucf101/ucf101_1', 'train'); ValueError naming --tfds."""
    # The split starts after the last ':' ahead of any '[': slices hold colons ('train[:10%]'), and
    # a version may precede the split ('ucf101:2.0.0:train').
    bracket = spec.find("[")
    colon = spec.rfind(":", 0, len(spec) if bracket < 0 else bracket)
    builder, split = spec[:max(colon, 0)], spec[colon + 1:]
    if colon < 0 or not builder or not split:
        raise ValueError(f"--tfds {spec!r}: expected NAME[/CONFIG]:SPLIT, e.g. 'ucf101:train' or "
                         f"'ucf101/ucf101_1:test'")
    return TfdsSpec(builder, split)


def sample_frame_indices(num_frames: int, source_fps: float, fps: float, *, sampling: str = "floor",
                         max_frames: int | None = None, max_seconds: float | None = None) -> np.ndarray:
    """Which of `num_frames` constant-rate source frames each output frame shows: int64 [N].

    Frame i is at i / source_fps and the clip ends at num_frames / source_fps; the rule is the one
    `video_decode` applies to a file's timestamps (`video_decode.sample_indices` computes the same
    thing for arbitrary times), and max_frames / max_seconds cap N as they do for files.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not source_fps > 0 or not fps > 0:
        raise ValueError(f"frame rates must be positive, got source {source_fps}, target {fps}")
    rate, fps_q = vd._as_fraction(source_fps), vd._as_fraction(fps)  # exact, as for files
    n = vd.num_output_frames(Fraction(num_frames) / rate, fps_q, sampling)
    if max_frames is not None:
        n = min(n, max_frames)
    if max_seconds is not None:
        n = min(n, max(1, math.ceil(vd._as_fraction(max_seconds) * fps_q)))
    # Slots never decrease with i (times do not), so "last frame whose slot <= k" is a search.
    slots = np.array([vd.sample_slot(Fraction(i) / rate, fps_q, sampling) for i in range(num_frames)])
    return np.searchsorted(slots, np.arange(n), side="right").astype(np.int64) - 1


def cut_variants(frames: np.ndarray, variants: Sequence[vd.Variant]) -> dict[str, np.ndarray]:
    """uint8 RGB frames [N, H, W, 3] -> {variant.name: [N, crop, crop, 3]}, the file path's geometry
    (each distinct resize once, then crop / flip)."""
    by_size = {r: vd.resize_short_side(frames, r) for r in dict.fromkeys(v.resize for v in variants)}
    return {v.name: v.apply(by_size[v.resize]) for v in variants}


@dataclasses.dataclass(frozen=True)
class FeatureKeys:
    video: str
    video_encoded: bool  # a tfds.features.Video: frames stored as images, decoded one by one
    label: str | None
    id: str | None


def find_features(features, spec: str) -> FeatureKeys:
    """Pick the video, label and id features of a FeaturesDict (see the module docstring)."""
    tfds = import_tfds(with_tf=False)
    F = tfds.features
    items = dict(features.items())
    video = next((k for k, f in items.items() if isinstance(f, F.Video)), None)
    encoded = video is not None
    if video is None and "video" in items and len(items["video"].shape) == 4:
        video = "video"
    if video is None:
        raise ValueError(f"--tfds {spec}: no video feature (a tfds.features.Video, or a [T, H, W, C] feature named "
                         f"'video'); the dataset has {sorted(items)}")
    shape, dtype = items[video].shape, np.dtype(items[video].np_dtype)
    if dtype != np.uint8 or shape[-1] not in (1, 3, None):
        raise ValueError(f"--tfds {spec}: feature {video!r} is {dtype} {shape}; uint8 frames with 1 or 3 channels "
                         f"are needed")
    labels = [k for k, f in items.items() if isinstance(f, F.ClassLabel)]
    label = "label" if "label" in labels else (labels[0] if labels else None)
    ident = next((k for k in ID_FEATURE_KEYS if k in items and isinstance(items[k], F.Text)), None)
    return FeatureKeys(video, encoded, label, ident)


def resolve_source_fps(name: str, metadata, source_fps: float | None, spec: str) -> tuple[float, str]:
    """(frames per second of the dataset's videos, where that came from)."""
    if source_fps is not None:
        return float(source_fps), "--source-fps"
    for key in FPS_METADATA_KEYS:
        if metadata is not None and key in metadata:
            return float(metadata[key]), f"dataset metadata '{key}'"
    if name in KNOWN_SOURCE_FPS:
        return KNOWN_SOURCE_FPS[name], "vimpac_jax.data.tfds_source.KNOWN_SOURCE_FPS"
    raise ValueError(f"--tfds {spec}: the dataset does not record its frame rate; pass --source-fps "
                     f"(the frames per second of its videos, e.g. 25 for UCF101)")


# ---------------------------------------------------------------------------------------------
# The source


class TfdsVideoSource:
    """The examples of one split of a prepared TFDS dataset, as tokenize items and decoded frames.

    TfdsVideoSource("ucf101:train", data_dir=D).items() lists every example (one read of the split,
    videos not decoded); decode_many(...) then decodes the examples asked for. Raises ValueError /
    FileNotFoundError naming --tfds for an unknown dataset, config or split, a dataset that is not
    prepared, or one without a video feature or frame rate; ImportError without TFDS.
    """

    def __init__(self, spec: str, *, data_dir: str | None = None, source_fps: float | None = None):
        self._tfds = tfds = import_tfds()
        self.spec_text, self.spec = spec, parse_spec(spec)
        try:
            self.builder = tfds.builder(self.spec.builder, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(f"--tfds {spec}: TFDS has no dataset {self.spec.name!r} (tfds.list_builders() lists "
                             f"them; a dataset without code is found by its files in --data-dir)") from None
        except (ValueError, KeyError, AssertionError) as e:  # e.g. an unknown config or version
            raise ValueError(f"--tfds {spec}: {e}") from None
        self.keys = find_features(self.builder.info.features, spec)
        self.source_fps, self.fps_from = resolve_source_fps(self.spec.name, self.builder.info.metadata,
                                                            source_fps, spec)
        config = self.builder.builder_config.name if self.builder.builder_config else None
        # Ids name the config: index 17 of ucf101_1's train split is not index 17 of ucf101_2's.
        self.id_prefix = f"{self.builder.name}{'/' + config if config else ''}:{self.spec.split}"
        self.locator = f"{self.builder.info.full_name}:{self.spec.split}"
        label_feature = self.builder.info.features[self.keys.label] if self.keys.label else None
        self.class_names: list[str] | None = list(label_feature.names) if label_feature is not None else None
        self._items: list[annotations.VideoItem] | None = None
        self._index: dict[str, int] = {}  # item path -> example position in the split

    def metadata(self) -> dict[str, Any]:
        """What the store's metadata.json records about its source."""
        return {"builder": self.builder.info.full_name, "split": self.spec.split,
                "data_dir": str(self.builder.data_dir_root), "video_feature": self.keys.video,
                "label_feature": self.keys.label, "id_feature": self.keys.id, "source_fps": self.source_fps,
                "source_fps_from": self.fps_from}

    def _dataset(self):
        """The split in file order, video frames left encoded (decoded per picked frame later)."""
        tfds = self._tfds
        decoders = {self.keys.video: tfds.decode.SkipDecoding()} if self.keys.video_encoded else None
        try:
            return self.builder.as_dataset(split=self.spec.split, shuffle_files=False, decoders=decoders,
                                           read_config=tfds.ReadConfig(interleave_cycle_length=1,
                                                                       try_autocache=False))
        except AssertionError:  # TFDS's "could not find data in ..."
            raise FileNotFoundError(f"--tfds {self.spec_text}: the dataset is not prepared in "
                                    f"{self.builder.data_dir_root}; prepare it first, e.g. tfds.builder("
                                    f"{self.spec.builder!r}, data_dir=DIR).download_and_prepare(), and pass "
                                    f"--data-dir DIR") from None
        except ValueError as e:  # an unknown split
            raise ValueError(f"--tfds {self.spec_text}: {e}") from None

    def items(self) -> list[annotations.VideoItem]:
        """Every example of the split as a VideoItem (path: 'FULL_NAME:SPLIT[i]'); read once, cached."""
        import tensorflow as tf  # noqa: PLC0415 - imported by import_tfds already

        if self._items is not None:
            return self._items
        start = time.monotonic()
        keep = [k for k in (self.keys.label, self.keys.id) if k]
        # Only the label and id leave TF (not the frames); "_" keeps an unlabelled set's element non-empty.
        ds = self._dataset().map(lambda ex: {"_": tf.constant(0), **{k: ex[k] for k in keep}})
        items, index = [], {}
        for i, ex in enumerate(self._tfds.as_numpy(ds)):
            label = int(ex[self.keys.label]) if self.keys.label else None
            vid = ex[self.keys.id].decode("utf-8") if self.keys.id else f"{self.id_prefix}:{i}"
            items.append(annotations.VideoItem(path=f"{self.locator}[{i}]", label=None if label == -1 else label,
                                               video_id=vid))
            index[items[-1].path] = i
        unique = annotations.unique_by_video_id(items)
        if len(unique) < len(items):
            log.info(f"tokenize: --tfds {self.spec_text}: dropped {len(items) - len(unique)} repeated video id(s)")
        self._index = {it.path: index[it.path] for it in unique}
        self._items = unique
        log.info(f"tokenize: --tfds {self.spec_text}: {len(unique)} videos in {self.locator} "
              f"({time.monotonic() - start:.1f}s; source frame rate {self.source_fps:g} fps from {self.fps_from})")
        return unique

    def decode_many(self, paths: Iterable[str], fps: float, variants: Sequence[vd.Variant], num_workers: int, *,
                    max_seconds: float | None = None, max_frames: int | None = None,
                    sampling: str = "floor") -> Iterator[tuple[int, str, Any]]:
        """`video_decode.decode_many` for items of this source: yields (index into paths, path, result),
        result {variant.name: uint8 [N, crop, crop, 3]} or a VideoDecodeError value, once per path.

        One read of the split, skipping (in TF, undecoded) the examples not asked for; picked frames
        are decoded and resized in `num_workers` threads (0: in this thread), in split order.
        """
        import tensorflow as tf  # noqa: PLC0415 - imported by import_tfds already

        if self._items is None:
            self.items()
        paths = list(paths)
        wanted = {self._index[p]: pos for pos, p in enumerate(paths)}  # KeyError: not an item of this source
        if not wanted:
            return
        todo = tf.constant(sorted(wanted), tf.int64)
        ds = self._dataset().enumerate().filter(lambda i, ex: tf.reduce_any(tf.equal(i, todo)))
        kw = dict(fps=fps, variants=tuple(variants), max_seconds=max_seconds, max_frames=max_frames,
                  sampling=sampling)

        def job(i: int, video) -> tuple[int, str, Any]:
            pos = wanted[i]
            return pos, paths[pos], self._decode_one(video, paths[pos], **kw)

        examples = ((int(i), ex[self.keys.video]) for i, ex in self._tfds.as_numpy(ds))
        if num_workers <= 0:
            for i, video in examples:
                yield job(i, video)
            return
        pending: deque[cf.Future] = deque()
        with cf.ThreadPoolExecutor(num_workers) as pool:  # TF decoding and libswscale run outside the GIL
            for i, video in examples:
                pending.append(pool.submit(job, i, video))
                if len(pending) >= 2 * num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _decode_one(self, video, path: str, *, fps, variants, max_seconds, max_frames, sampling):
        """One example's frames (encoded images [T] or uint8 [T, H, W, C]) -> variants, or the error."""
        try:
            if len(video) == 0:
                return vd.VideoDecodeError(path, "the example has no frames")
            picks = sample_frame_indices(len(video), self.source_fps, fps, sampling=sampling,
                                         max_frames=max_frames, max_seconds=max_seconds)
            unique, inverse = np.unique(picks, return_inverse=True)
            if self.keys.video_encoded:
                image = self.builder.info.features[self.keys.video].feature  # the per-frame Image feature
                frames = np.stack([np.asarray(image.decode_example(video[j])) for j in unique])
            else:
                frames = np.asarray(video)[unique]
            if frames.shape[-1] == 1:
                frames = np.repeat(frames, 3, axis=-1)
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                return vd.VideoDecodeError(path, f"expected uint8 [T, H, W, 3] frames, got {frames.dtype} "
                                                 f"{frames.shape}")
            # Resize and crop the distinct frames once, then repeat them (fps above the source rate).
            return {name: out[inverse] for name, out in cut_variants(frames, variants).items()}
        except Exception as e:  # a corrupt image, an odd shape: reported against the example
            return vd.VideoDecodeError(path, f"{type(e).__name__}: {e}")
