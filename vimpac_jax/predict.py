"""Classify video files with a fine-tuned model: `vimpac predict` and `vimpac_jax.load_classifier`.

    clf = vimpac_jax.load_classifier("runs/ucf_small")        # loads and compiles once
    clf.predict("video.mp4")                                  # [(class name, probability), ...] top 5
    clf.predict_tokens(tokens)                                # int [V, T, h, w] views of one video

A video goes through the chain of `vimpac tokenize` + `vimpac evaluate`, with the same code:
decoding at the store's fps into its test crops (`data/video_decode.py` Variants), the run's
tokenizer (`tokenizer/interface.py`, frames of many videos batched by `tokenize/batcher.FrameBatcher`
and sharded over the local devices), K uniformly spaced clips per crop (`data/pipelines.test_views`),
softmax scores averaged over the K x C views (`training/finetune_step.average_over_views`).

The model source W is one of
  a fine-tuning workdir   config.json + checkpoints/ (latest step): fps, frame size, crops, clip
                          rate, class names and the tokenizer come from the run config and its
                          token store's metadata.json; a `tokenizer` passed anyway must be that one.
  a model checkpoint      `vimpac convert official` (a released fine-tuned model): the tokenizer
                          must be given; the released protocol is used (10 clips x 3
                          crops, frames of 8 x the token grid, 2 fps: the released scripts' --frame-rate 2).
  a StableHLO directory   `vimpac export --format stablehlo`: as a model checkpoint.
Class names: the run's (`tasks/multiview.py`: `class_names_of`), or the class_names.txt beside a checkpoint or an
export (`vimpac export` writes the run's there); `class_names` / --class-names override them.
A given tokenizer must make the model's token grid at that frame size and have the model's number
of codes, else the load is refused naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from vimpac_jax.data import video_decode as vd

# Protocol of a model that recorded none (a converted released checkpoint, an export): the
# released test and the clip rate of the released fine-tuning scripts.
RELEASED_NUM_CLIPS = 10
RELEASED_CROPS = "three"
RELEASED_FPS = 2.0
RELEASED_DOWNSAMPLE = 8  # `conversion/official.py` makes the grid frame_size // 8 (the DALL-E dVAE's)
NUM_SPECIAL_IDS = 5  # ids after the codes (`constants.py`): vocab_size = codes + 5
STABLEHLO_KINDS = ("stablehlo",)


class PredictError(ValueError):
    """W, the tokenizer or an option does not make a classifier; raised before any video is read."""


@dataclasses.dataclass(frozen=True)
class ViewProtocol:
    """How a video becomes the model's input: decode at `fps` into the `crops` (frame size
    crops[i].crop), then K = `num_clips` clips of `clip_len` frames, every `clip_step`-th frame."""

    fps: float
    crops: tuple[vd.Variant, ...]
    clip_len: int
    clip_step: int
    num_clips: int
    sampling: str = "floor"
    max_seconds: Optional[float] = None
    max_frames: Optional[int] = None

    @property
    def num_views(self) -> int:
        return self.num_clips * len(self.crops)

    def describe(self) -> dict[str, Any]:
        return {"clips": self.num_clips, "crops": [v.name for v in self.crops], "views": self.num_views,
                "clip_len": self.clip_len, "clip_step": self.clip_step, "fps": self.fps,
                "frame_size": self.crops[0].crop, "sampling": self.sampling}


@dataclasses.dataclass
class Prediction:
    """One video: `top` [(class name, probability)] best first and `probs` float32 [C], or the
    reason it was skipped in `error`."""

    path: str
    top: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    probs: Optional[np.ndarray] = None
    error: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "top": [{"class": c, "probability": p} for c, p in self.top]}


# ---------------------------------------------------------------------------------------------
# The classifier


class Classifier:
    """A loaded model, tokenizer and view protocol (`load_classifier`).

    scores(views int32 [N, V, T, h, w]) -> float32 [N, C] runs in batches of at most `batch_size`
    videos over the local devices; a short batch is padded to a power-of-two bucket
    (`tokenizer.interface.bucket_size`), so repeated calls reuse at most log2(batch_size) + 1
    compiled shapes and never trace again.
    """

    def __init__(self, *, scores_fn: Callable, mesh, model_config: dict, tokenizer, protocol: ViewProtocol,
                 class_names: Sequence[str], identity: dict, batch_size: int):
        from vimpac_jax.training import sharding as shd

        self._scores_fn = scores_fn
        self.mesh = mesh
        self.model_config = dict(model_config)
        self.tokenizer = tokenizer
        self.protocol = protocol
        self.class_names = list(class_names)
        self.identity = identity
        n_dev = mesh.size
        self.batch_size = -(-int(batch_size) // n_dev) * n_dev
        self._sharding = shd.batch_sharding(mesh)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- tokens -> scores ---------------------------------------------------------------------

    def scores(self, views) -> np.ndarray:
        """views int [N, V, T, h, w] (V views of each of N videos) -> softmax averaged over V, float32 [N, C]."""
        import jax

        from vimpac_jax.models.config import check_tokens
        from vimpac_jax.tokenizer.interface import bucket_size

        views = np.asarray(views)
        if views.ndim != 5:
            raise ValueError(f"views: expected int tokens [N, V, T, h, w], got shape {list(views.shape)}")
        n, v = views.shape[:2]
        check_tokens(views.reshape(n * v, *views.shape[2:]), self.model_config, "views")
        out = []
        for start in range(0, n, self.batch_size):
            chunk = views[start:start + self.batch_size].astype(np.int32)
            size = bucket_size(len(chunk), self.batch_size, self.mesh.size)
            if size != len(chunk):
                # Padding videos of code 0 rather than PAD, as the test's (no all-PAD attention line).
                chunk = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:], np.int32)])
            probs = self._scores_fn(jax.device_put(chunk, self._sharding))
            out.append(np.asarray(jax.device_get(probs))[:min(self.batch_size, n - start)])
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    def ranked(self, probs: np.ndarray, top: Optional[int] = 5) -> list[tuple[str, float]]:
        """probs [C] -> the `top` (all when None) (class name, probability), best first."""
        order = np.argsort(-probs, kind="stable")[:top]
        return [(self.class_names[i], float(probs[i])) for i in order]

    def predict_tokens(self, tokens, top: Optional[int] = 5) -> list[tuple[str, float]]:
        """Clips already tokenized: int [T, h, w] (one clip) or [V, T, h, w] (V views of one video,
        scores averaged) -> the `top` (class name, probability)."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 3:
            tokens = tokens[None]
        if tokens.ndim != 4:
            raise ValueError(f"tokens: expected [T, h, w] or [V, T, h, w], got shape {list(tokens.shape)}")
        return self.ranked(self.scores(tokens[None])[0], top)

    # -- files -> scores ----------------------------------------------------------------------

    def views_from_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens of every crop of one video, crop after crop [C·F, h, w] -> int32 views [V, T, h, w]."""
        from vimpac_jax.data.pipelines import test_views

        p = self.protocol
        per = len(tokens) // len(p.crops)  # every crop has the same frames (one decode, several crops)
        crops = [tokens[c * per:(c + 1) * per] for c in range(len(p.crops))]
        return test_views(crops, p.clip_len, p.clip_step, p.num_clips)

    def predict(self, path, top: Optional[int] = 5) -> list[tuple[str, float]]:
        """One video file -> the `top` (class name, probability); VideoDecodeError when it cannot be read."""
        (result,) = self.predict_files([path], top=top, workers=0)
        if result.error is not None:
            raise vd.VideoDecodeError(path, result.error)
        return result.top

    def predict_files(self, paths: Iterable, *, top: Optional[int] = 5, workers: int = 0,
                      progress=None, on_result: Optional[Callable[[int, Prediction], None]] = None
                      ) -> list[Prediction]:
        """Many files, in input order; a file that cannot be decoded gets `error` and is skipped.
        on_result(index, prediction) is called as each file's result is made (in the order they
        finish), so a caller can put results out before the last file is done.

        Decoding runs in `workers` processes (`video_decode.decode_many`; 0 = this process), the
        frames of many videos share the tokenizer's device batches, and the views of up to
        `batch_size` videos go to the model at once. progress: a `vimpac_jax.progress.Progress` of videos (`counted` frames).
        """
        from vimpac_jax.tokenize.batcher import FrameBatcher

        paths = [os.fspath(p) for p in paths]
        p, tok = self.protocol, self.tokenizer
        hw = (int(self.model_config["height"]), int(self.model_config["width"]))
        results: list[Optional[Prediction]] = [None] * len(paths)
        batcher = FrameBatcher(lambda frames: tok.encode_tokens_async(frames, checked=True), tok.batch_size, hw)
        ready: list[tuple[int, np.ndarray]] = []

        def score(count: int) -> None:
            batch, ready[:] = ready[:count], ready[count:]
            probs = self.scores(np.stack([views for _, views in batch]))
            for (index, _), row in zip(batch, probs):
                results[index] = Prediction(paths[index], self.ranked(row, top), row)
                if on_result is not None:
                    on_result(index, results[index])

        def add(done) -> None:
            for index, tokens in done:
                ready.append((index, self.views_from_tokens(tokens)))
                if progress is not None:
                    progress.update(add=1, frames=len(tokens))
            while len(ready) >= self.batch_size:
                score(self.batch_size)

        # allow_partial=False: the rule of `vimpac tokenize` (tokenize/job.py), so a file the store
        # would not take (cut short, `video_decode.decode_frames`) is skipped, not classified on a prefix.
        decoded = vd.decode_many(paths, p.fps, p.crops, workers, max_seconds=p.max_seconds,
                                 max_frames=p.max_frames, sampling=p.sampling, allow_partial=False)
        for index, path, result in decoded:
            if isinstance(result, vd.VideoDecodeError):
                results[index] = Prediction(path, error=result.reason)
                if on_result is not None:
                    on_result(index, results[index])
                if progress is not None:
                    progress.update(failed=1)
                continue
            add(batcher.add(index, np.concatenate([result[v.name] for v in p.crops])))
        add(batcher.flush())
        while ready:
            score(len(ready))
        return results


# ---------------------------------------------------------------------------------------------
# Loading


def _source_kind(path: Path) -> str:
    from vimpac_jax.export import stablehlo_format
    from vimpac_jax.export.source import ExportSourceError, source_kind

    if (path / stablehlo_format.MODEL_FILE).is_file() and (path / stablehlo_format.SIGNATURE_FILE).is_file():
        return "stablehlo"
    try:
        return source_kind(path)
    except ExportSourceError as e:
        raise PredictError(f"{e}, nor an exported StableHLO directory ({stablehlo_format.MODEL_FILE} + "
                           f"{stablehlo_format.SIGNATURE_FILE})") from None


def _model_config(path: Path, kind: str) -> dict:
    from vimpac_jax.export import source, stablehlo_format

    try:  # completed by its loader (every field), or a ValueError naming the file
        config = stablehlo_format.load_model_config(path) if kind == "stablehlo" else source.load_model_config(path)
    except ValueError as e:
        raise PredictError(str(e)) from None
    if config["task"] != "finetune" or int(config["num_classes"] or 0) <= 0:
        raise PredictError(f"{path}: not a classifier (model task={config['task']!r}, "
                           f"num_classes={config['num_classes']}); predict needs a fine-tuned model")
    return config


def model_codes(model_config: dict) -> tuple[int, bool]:
    """(number of codes, recorded): the codes of the model's tokenizer when the model records them
    (`mlm_codes`), else the codes its embedding has room for (vocab_size - 5 specials)."""
    if model_config["mlm_codes"]:
        return int(model_config["mlm_codes"]), True
    return int(model_config["vocab_size"]) - NUM_SPECIAL_IDS, False


def check_tokenizer_fits(tok, model_config: dict, frame_size: int, *, exact_codes: bool, source: str) -> None:
    """The tokenizer must make the model's h x w grid from frame_size-pixel crops and have its
    number of codes: exactly when the model records it (mlm_codes) or `exact_codes` (a released
    model, whose vocab_size is its tokenizer's codes + the specials); else at most the room of its
    embedding (our configs keep 8197 rows whatever the tokenizer)."""
    grid = (int(model_config["height"]), int(model_config["width"]))
    h, w = tok.token_hw(frame_size, frame_size)
    if frame_size % tok.downsample or (h, w) != grid:
        raise PredictError(f"tokenizer {tok.directory} makes a {h}x{w} token grid of {frame_size}-px frames "
                           f"(downsampling {tok.downsample}), the model {source} expects {grid[0]}x{grid[1]}")
    codes, recorded = model_codes(model_config)
    if tok.vocab_size > codes or ((recorded or exact_codes) and tok.vocab_size != codes):
        raise PredictError(f"tokenizer {tok.directory} has a vocabulary of {tok.vocab_size} codes, the model "
                           f"{source} was trained on {codes} codes")


def _same_tokenizer(recorded: dict, tok) -> list[str]:
    """Fields of the recorded tokenizer identity that the loaded tokenizer does not share."""
    got = tok.identity()
    return [k for k in ("kind", "config", "weights_sha256")
            if json.dumps(recorded.get(k), sort_keys=True) != json.dumps(got.get(k), sort_keys=True)]


def _load_tokenizer(directory, dtype: str = "float32", batch_size: Optional[int] = None, devices=None):
    import jax.numpy as jnp

    from vimpac_jax.tokenizer.interface import TokenizerLoadError, load_tokenizer

    try:
        return load_tokenizer(directory, dtype=jnp.dtype(dtype), batch_size=batch_size, devices=devices)
    except TokenizerLoadError as e:
        raise PredictError(f"--tokenizer: {e}") from None


def _crop_variants(meta: dict, names: Sequence[str], store: str) -> tuple[vd.Variant, ...]:
    if meta.get("variant_set") not in vd.VARIANT_SETS or "size" not in meta:
        raise PredictError(f"token store {store} was not made by `vimpac tokenize` from video files "
                           f"(its metadata.json has no variant_set/size): its crops cannot be made again")
    by_name = {v.name: v for v in vd.variants_for(meta["variant_set"], int(meta["size"]), meta.get("resize"))}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise PredictError(f"token store {store}: test crops {missing} are not variants of the "
                           f"{meta['variant_set']!r} set")
    return tuple(by_name[n] for n in names)


def _workdir_protocol(path: Path, model_config: dict, tokenizer, num_clips, crops, devices, tok_batch):
    """(protocol, class names, tokenizer) recorded by a fine-tuning run and its token store."""
    from vimpac_jax.data import token_store
    from vimpac_jax.data.pipelines import frame_step
    from vimpac_jax.training import workdir as workdir_lib
    from vimpac_jax.tasks.multiview import class_names_of, eval_crop_names, eval_crops_of

    config = workdir_lib.read_config(path)
    store = config.data.eval_store or config.data.train_store
    try:
        meta = token_store.read_metadata(store)
    except (FileNotFoundError, ValueError) as e:
        raise PredictError(f"{path}: the run's token store {store} is not readable ({e}); its metadata.json "
                           f"holds the fps, frame size and tokenizer") from None
    recorded = meta.get("tokenizer") or {}
    directory = tokenizer or meta.get("tokenizer_dir")
    if not directory:
        raise PredictError(f"{path}: the run's token store {store} does not record its tokenizer's directory; "
                           f"pass --tokenizer (it must be the tokenizer that made the store)")
    tok = _load_tokenizer(directory, recorded.get("compute_dtype", "float32"), tok_batch, devices)
    differ = _same_tokenizer(recorded, tok)
    if differ:
        raise PredictError(f"tokenizer {directory} is not the one that made {store} (differs in: "
                           f"{', '.join(differ)}; the store's has weights_sha256={recorded.get('weights_sha256')}, "
                           f"this one {tok.weights_sha256})")
    names = eval_crop_names(meta.get("variants") or [], eval_crops_of(config, crops), config.data.eval_variants)
    protocol = ViewProtocol(
        fps=float(meta["fps"]), crops=_crop_variants(meta, names, store), clip_len=int(model_config["clip_len"]),
        clip_step=frame_step(float(meta["fps"]), config.data.clip_fps),
        num_clips=int(num_clips or config.data.eval_clips), sampling=meta.get("sampling", "floor"),
        max_seconds=meta.get("max_seconds"), max_frames=meta.get("max_frames"))
    check_tokenizer_fits(tok, model_config, protocol.crops[0].crop, exact_codes=False, source=str(path))
    return protocol, class_names_of(config), tok, int(config.data.eval_batch_size)


def _given_protocol(path: Path, kind: str, model_config: dict, tokenizer, num_clips, crops, fps, devices, tok_batch):
    """A model that recorded no protocol: the released test at the frame size of its grid."""
    from vimpac_jax.tasks.multiview import eval_crop_names

    if not tokenizer:
        raise PredictError(f"{path} records no tokenizer (a converted or exported model): pass --tokenizer, the "
                           f"tokenizer directory its training tokens were made with")
    tok = _load_tokenizer(tokenizer, batch_size=tok_batch, devices=devices)
    size = int(model_config["height"]) * RELEASED_DOWNSAMPLE
    # A model checkpoint is a converted released one; an export may be of our own run (8197 rows).
    check_tokenizer_fits(tok, model_config, size, exact_codes=kind == "checkpoint", source=str(path))
    variants = vd.variants_for("finetune_noflip", size)
    names = eval_crop_names([v.name for v in variants], crops or RELEASED_CROPS, None)
    fps = float(fps or RELEASED_FPS)
    protocol = ViewProtocol(fps=fps, crops=tuple(v for v in variants if v.name in names),
                            clip_len=int(model_config["clip_len"]), clip_step=1,
                            num_clips=int(num_clips or RELEASED_NUM_CLIPS))
    from vimpac_jax.export.source import class_names  # an export's class_names.txt (`vimpac export`)

    return protocol, class_names(path), tok, 8


def _model_scores_fn(path: Path, kind: str, model_config: dict, mesh):
    """jitted tokens int32 [B, V, T, h, w] (sharded over `mesh`) -> probs [B, C], and the step."""
    import jax
    from jax.sharding import PartitionSpec as P

    from vimpac_jax.training import sharding as shd
    from vimpac_jax.training.finetune_step import average_over_views, make_eval_step

    if kind == "stablehlo":
        from vimpac_jax.export.stablehlo_format import load_stablehlo

        exported = load_stablehlo(path)

        def per_device(tokens):
            return average_over_views(lambda clips: exported.call(clips)["logits"], tokens)["probs"]

        # The module was lowered for one device with a symbolic batch: each device runs its slice.
        fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(shd.BATCH_AXES), out_specs=P(shd.BATCH_AXES),
                                   check_vma=False))
        return fn, None
    from vimpac_jax.export.source import ExportSourceError, read_exportable

    try:
        _, variables, step = read_exportable(path)  # a workdir's newest intact step, and its number
    except ExportSourceError as e:
        raise PredictError(str(e)) from None
    replicated = shd.replicated(mesh)
    params = jax.device_put(variables["params"], replicated)
    batch_stats = jax.device_put(variables.get("batch_stats") or {}, replicated)
    eval_step = make_eval_step(model_config, mesh)
    return (lambda tokens: eval_step(params, batch_stats, tokens)["probs"]), step


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_classifier(workdir, *, tokenizer=None, num_clips: Optional[int] = None, crops: Optional[str] = None,
                    fps: Optional[float] = None, class_names: Optional[Sequence[str]] = None,
                    batch_size: Optional[int] = None, tokenizer_batch_size: Optional[int] = None,
                    devices=None) -> Classifier:
    """Load W (a fine-tuning workdir, a `vimpac convert official` checkpoint or a StableHLO export
    directory) and its tokenizer once; see the module docstring for what comes from where.

    num_clips, crops ('three'/'3' or 'center'/'1'): the views (default: the run's, else 10 x 3).
    fps: decoding rate of a model that recorded none (default 2). class_names: names of the
    classes (default: the run's, else '0', '1', ...). batch_size: videos per model call over the
    local devices (default: the run's eval_batch_size, else 8). devices: default jax.local_devices().
    Raises PredictError naming the file or option at fault, before anything compiles.
    """
    import jax

    from vimpac_jax.training import sharding as shd

    path = Path(workdir)
    if not path.is_dir():
        raise PredictError(f"--workdir {path}: no such directory")
    if crops not in (None, "3", "1", "three", "center"):
        raise PredictError(f"--crops must be 3 or 1 (center), got {crops!r}")
    crops = {"3": "three", "1": "center"}.get(crops, crops)
    if num_clips is not None and int(num_clips) < 1:
        raise PredictError(f"--clips must be >= 1, got {num_clips}")
    kind = _source_kind(path)
    model_config = _model_config(path, kind)
    devices = list(jax.local_devices() if devices is None else devices)
    if kind == "workdir":
        protocol, names, tok, run_batch = _workdir_protocol(path, model_config, tokenizer, num_clips, crops, devices,
                                                            tokenizer_batch_size)
    else:
        if fps is not None and not fps > 0:
            raise PredictError(f"--fps must be positive, got {fps}")
        protocol, names, tok, run_batch = _given_protocol(path, kind, model_config, tokenizer, num_clips, crops, fps,
                                                          devices, tokenizer_batch_size)
    num_classes = int(model_config["num_classes"])
    names = list(class_names or names or [str(i) for i in range(num_classes)])
    if len(names) != num_classes:
        raise PredictError(f"{len(names)} class names for the {num_classes} classes of {path}")
    mesh = shd.make_mesh(None, devices=devices)
    scores_fn, step = _model_scores_fn(path, kind, model_config, mesh)
    identity = {"kind": kind, "path": str(path.absolute()), "step": step,
                "model": {k: model_config[k] for k in ("num_layers", "hidden_dim", "layout", "clip_len", "height",
                                                           "width", "num_classes")},
                "tokenizer": {"directory": tok.directory, "kind": tok.kind, "weights_sha256": tok.weights_sha256}}
    if kind == "stablehlo":
        from vimpac_jax.export.stablehlo_format import MODEL_FILE

        identity["sha256"] = _file_sha256(path / MODEL_FILE)
    elif kind == "checkpoint":
        from vimpac_jax import checkpoints

        record = json.loads((path / checkpoints.CONFIG_FILE).read_text())
        identity["source"] = (record.get("metadata") or {}).get("source")
    return Classifier(scores_fn=scores_fn, mesh=mesh, model_config=model_config, tokenizer=tok, protocol=protocol,
                      class_names=names, identity=identity, batch_size=int(batch_size or run_batch))


def format_prediction(result: Prediction) -> str:
    if result.error is not None:
        return f"{result.path}: skipped: {result.error}"
    lines = [result.path]
    lines += [f"  {rank}. {name}  {prob:.4f}" for rank, (name, prob) in enumerate(result.top, 1)]
    return "\n".join(lines)


def predictions_json(clf: Classifier, results: Sequence[Prediction]) -> dict[str, Any]:
    """What `--json` writes: each video's top classes, the views used and the model's identity."""
    return {"model": clf.identity, "views": clf.protocol.describe(),
            "predictions": [r.to_json() for r in results if r.error is None],
            "failed": [r.to_json() for r in results if r.error is not None]}


def log(message: str) -> None:
    logging.getLogger(__name__).warning(f"vimpac predict: {message}")
