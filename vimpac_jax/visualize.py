"""The paper's Fig. 5 for a few clips: what the pre-trained model reconstructs under a block mask.

For each clip of T frames the figure has four rows (T frames each, left to right):
  1. original     the decoded video frames (center crop at the tokenizer's frame size);
  2. round-trip   the frames encoded into tokens and decoded back by the tokenizer: the best
                  any token model can show;
  3. masked       row 2 with the tokens of the block mask painted grey (`MASK_GREY`);
  4. predicted    row 2 where not masked; where masked, the frames decoded from the model's
                  argmax prediction of each masked token (over the tokenizer's codes only).

Rows 3 and 4 differ exactly on the masked tokens' pixels: outside the mask both show row 2.
The prediction is decoded over the whole frame (the decoder is convolutional, so a token's
pixels depend on its neighbours) and only the masked tokens' pixels are pasted into row 4.

The model sees the [MASK] id at every masked token (no 80/10/10 noise: the figure asks what the
model infers from the context alone). Masks are drawn like in pre-training (`block_mask`).

The picture (`figure_image`) names each row on its left and outlines the masked tokens' region
in rows 3 and 4 (`OUTLINE`); `draw_figure` makes it from a run and a list of videos (`vimpac
visualize`, `vimpac demo`) and writes it as a PNG (and to the run's TensorBoard). Drawing needs
the `viz` extra (Pillow, see `vimpac_jax/plots.py`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from vimpac_jax import plots
from vimpac_jax.constants import MASK_ID

log = logging.getLogger(__name__)

ROWS = ("original", "round-trip", "masked", "predicted")
OUTLINED_ROWS = ("masked", "predicted")  # rows whose masked tokens are outlined
MASK_GREY = 0.5
OUTLINE = (230, 25, 25)  # the masked region's border (RGB)
TEXT = (0, 0, 0)


@dataclasses.dataclass
class Reconstruction:
    """Everything one figure shows; images are float32 in [0, 1], [N, T, H, W, 3]."""

    original: np.ndarray
    roundtrip: np.ndarray
    masked: np.ndarray
    predicted: np.ndarray
    mask: np.ndarray  # bool [N, T, h, w]: the masked tokens
    tokens: np.ndarray  # int [N, T, h, w]: the tokenizer's codes
    predicted_tokens: np.ndarray  # int [N, T, h, w]: tokens outside the mask, argmax inside


def token_mask_to_pixels(mask: np.ndarray, downsample: int) -> np.ndarray:
    """bool [..., h, w] -> bool [..., h*downsample, w*downsample, 1]: each token's pixel block."""
    pixels = np.repeat(np.repeat(mask, downsample, axis=-2), downsample, axis=-1)
    return pixels[..., None]


def predict_masked_tokens(model, variables, inputs: np.ndarray, num_codes: int) -> np.ndarray:
    """Argmax over the first `num_codes` ids of the MLM logits at every position.

    inputs int [N, T, h, w] (with MASK_ID where masked) -> int32 [N, T, h, w].
    """
    import jax
    import jax.numpy as jnp

    @jax.jit
    def predict(variables, tokens):
        logits = model.apply(variables, tokens, None, train=False)["mlm_logits"]  # [N, T, h, w, V]
        return jnp.argmax(logits[..., :num_codes], axis=-1).astype(jnp.int32)

    return np.asarray(predict(variables, jnp.asarray(inputs, jnp.int32)))


def reconstruct(model, variables, tokenizer, frames: np.ndarray, key, num_blocks: int) -> Reconstruction:
    """frames uint8 [N, T, H, W, 3] (H, W multiples of the tokenizer's down-sampling) -> the rows.

    `model` is a pre-training model (`build_model` of a pre-training config) whose clip shape is
    [T, H/downsample, W/downsample]; `tokenizer` a loaded `Tokenizer` with a decoder.
    """
    from vimpac_jax.training.masking import block_mask

    n, t, height, width, _ = frames.shape
    tokens = tokenizer.encode_tokens(frames.reshape(n * t, height, width, 3))
    h, w = tokens.shape[-2:]
    tokens = tokens.reshape(n, t, h, w)
    roundtrip = tokenizer.decode(tokens.reshape(n * t, h, w)).reshape(n, t, height, width, 3)
    mask = np.asarray(block_mask(key, (n, t, h, w), num_blocks))
    predicted_tokens = predict_masked_tokens(model, variables, np.where(mask, MASK_ID, tokens),
                                             tokenizer.vocab_size)
    predicted_tokens = np.where(mask, predicted_tokens, tokens)
    decoded = tokenizer.decode(predicted_tokens.reshape(n * t, h, w)).reshape(roundtrip.shape)
    mask_px = token_mask_to_pixels(mask, tokenizer.downsample)
    return Reconstruction(
        original=frames.astype(np.float32) / 255.0,
        roundtrip=roundtrip.astype(np.float32),
        masked=np.where(mask_px, np.float32(MASK_GREY), roundtrip).astype(np.float32),
        predicted=np.where(mask_px, decoded, roundtrip).astype(np.float32),
        mask=mask, tokens=tokens, predicted_tokens=predicted_tokens)


def mask_border(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """bool [..., H, W] -> bool [..., H, W]: the pixels of `mask` within `width` of its border
    (a neighbour outside the mask, or the image edge)."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, [(0, 0)] * (inner.ndim - 2) + [(1, 1), (1, 1)], constant_values=False)
        inner = (inner & padded[..., :-2, 1:-1] & padded[..., 2:, 1:-1]
                 & padded[..., 1:-1, :-2] & padded[..., 1:-1, 2:])
    return mask & ~inner


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the cells of a figure are: frame f of row r of clip i is the cell at
    (top(i, r), left(f)), `cell_h` x `cell_w` pixels; `margin` columns of row labels on the left."""

    clips: int
    frames: int
    cell_h: int
    cell_w: int
    margin: int
    gap: int
    clip_gap: int

    def top(self, clip: int, row: int) -> int:
        return clip * (self.clip_h + self.clip_gap) + row * (self.cell_h + self.gap)

    def left(self, frame: int) -> int:
        return self.margin + frame * (self.cell_w + self.gap)

    @property
    def clip_h(self) -> int:
        return len(ROWS) * self.cell_h + (len(ROWS) - 1) * self.gap

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.clips * self.clip_h + (self.clips - 1) * self.clip_gap,
                self.margin + self.frames * self.cell_w + (self.frames - 1) * self.gap, 3)


def _label_width(font, draw) -> int:
    return int(np.ceil(max(draw.textlength(name, font=font) for name in ROWS))) + 8


def figure_image(rec: Reconstruction, *, scale: int = 4, gap: int = 2, clip_gap: int = 8) -> np.ndarray:
    """The rows of every clip tiled into one uint8 image [H, W, 3] on a white ground.

    Clip i occupies four rows of `ROWS` order, named on the left, frames left to right; each frame
    is enlarged `scale` times (nearest neighbour), cells are `gap` pixels apart, clips `clip_gap`.
    In the `OUTLINED_ROWS` the border of the masked tokens' region is drawn in `OUTLINE`
    (`max(1, scale // 2)` pixels wide, inside the region). See `figure_layout` for the cells.
    """
    pil = plots.require("PIL.Image", "drawing Fig. 5")
    from PIL import ImageDraw, ImageFont

    layout = figure_layout(rec, scale=scale, gap=gap, clip_gap=clip_gap)
    n, t, height, _, _ = rec.original.shape
    downsample = height // rec.mask.shape[-2]
    pixels = np.repeat(np.repeat(rec.mask, downsample * scale, axis=-2), downsample * scale, axis=-1)
    border = mask_border(pixels, max(1, scale // 2))  # [N, T, H*scale, W*scale]
    image = np.full(layout.shape, 255, np.uint8)
    rows = {"original": rec.original, "round-trip": rec.roundtrip, "masked": rec.masked, "predicted": rec.predicted}
    for i in range(n):
        for r, name in enumerate(ROWS):
            top = layout.top(i, r)
            for f in range(t):
                cell = np.clip(np.rint(rows[name][i, f] * 255.0), 0, 255).astype(np.uint8)
                cell = np.repeat(np.repeat(cell, scale, axis=0), scale, axis=1)
                if name in OUTLINED_ROWS:
                    cell[border[i, f]] = OUTLINE
                left = layout.left(f)
                image[top:top + layout.cell_h, left:left + layout.cell_w] = cell
    picture = pil.fromarray(image, "RGB")
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default()
    for i in range(n):
        for r, name in enumerate(ROWS):
            _, y0, _, y1 = draw.textbbox((0, 0), name, font=font)
            draw.text((4, layout.top(i, r) + (layout.cell_h - (y1 - y0)) // 2 - y0), name, fill=TEXT, font=font)
    return np.asarray(picture)


def figure_layout(rec: Reconstruction, *, scale: int = 4, gap: int = 2, clip_gap: int = 8) -> Layout:
    """The `Layout` of `figure_image(rec, ...)`."""
    pil = plots.require("PIL.Image", "drawing Fig. 5")
    from PIL import ImageDraw, ImageFont

    n, t, height, width, _ = rec.original.shape
    margin = _label_width(ImageFont.load_default(), ImageDraw.Draw(pil.new("RGB", (1, 1))))
    return Layout(clips=n, frames=t, cell_h=height * scale, cell_w=width * scale, margin=margin, gap=gap,
                  clip_gap=clip_gap)


# ----------------------------------------------------------------------------------------------
# The figure of a run.


class VisualizeError(ValueError):
    """Bad input to `draw_figure` (the message names the argument)."""


# The frame rate of a run whose clips' rate is unknown (a model checkpoint without its workdir,
# or a store that cannot be read): the README's pre-training stores (`vimpac tokenize --fps 2`).
DEFAULT_CLIP_FPS = 2.0


def _train_store_meta(run_config: dict) -> dict:
    """The run's training store's metadata.json (`token_store.read_metadata`), or {} when it
    cannot be read."""
    from vimpac_jax.data import token_store

    try:
        meta = token_store.read_metadata(run_config["data"]["train_store"])
    except (OSError, KeyError, TypeError, ValueError):  # ValueError: bad JSON, an incomplete store
        return {}
    return meta if isinstance(meta, dict) else {}


def _train_store_tokenizer_hash(store_meta: dict) -> Optional[str]:
    """The weights hash the run's training store was tokenized with, if its metadata says."""
    try:
        return store_meta["tokenizer"]["weights_sha256"]
    except (KeyError, TypeError):
        return None


def clip_fps_of_run(run_config: dict, store_meta: dict) -> float:
    """The frame rate of the run's clips: `data.clip_fps`, else (None: "the stored fps", see
    configs/common.py) its training store's, else DEFAULT_CLIP_FPS."""
    fps = run_config.get("data", {}).get("clip_fps")
    if fps is None:
        fps = store_meta.get("fps")
    return float(fps) if fps else DEFAULT_CLIP_FPS


def draw_figure(run_dir, tokenizer_dir, paths: Sequence[str], out, *, num_videos: int = 4,
                mask_blocks: Optional[int] = None, seed: int = 0, scale: int = 4) -> dict:
    """Fig. 5 of the pre-training run (or model checkpoint) `run_dir` on the first `num_videos`
    usable videos of `paths`, written to the PNG `out`; a training workdir also gets it in its
    TensorBoard log (tag `fig5/reconstruction`, at its latest checkpoint's step).

    The first T frames of each video are used (T = the model's clip length), decoded at the run's
    clip fps and center-cropped to the tokenizer's frame size; videos that cannot be decoded or
    are shorter are skipped (logged). `tokenizer_dir` must be the tokenizer of the run's tokens
    (checked against its training store's metadata when readable). Raises `VisualizeError`, or
    `plots.VizExtraMissing` without Pillow.
    Returns {'out', 'clips', 'frames', 'size', 'skipped', 'mask_blocks', 'masked', 'accuracy'}.
    """
    plots.require("PIL.Image", "drawing Fig. 5")  # VizExtraMissing, before any work
    import jax

    from vimpac_jax.data import video_decode as vd
    from vimpac_jax.export.source import ExportSourceError, load_model_config, read_exportable
    from vimpac_jax.models.model import build_model
    from vimpac_jax.tokenizer.interface import TokenizerLoadError, load_tokenizer

    run_dir, tokenizer_dir = Path(run_dir), Path(tokenizer_dir)
    try:
        model_cfg = load_model_config(run_dir)
    except ExportSourceError as e:
        raise VisualizeError(str(e)) from None
    if model_cfg["task"] != "pretrain":
        raise VisualizeError(f"--workdir {run_dir}: a {model_cfg['task']!r} model; the figure needs a "
                             "pre-training model (its MLM head)")
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except (TokenizerLoadError, OSError) as e:
        raise VisualizeError(f"--tokenizer {tokenizer_dir}: {e}") from None
    if not tokenizer.has_decoder:
        raise VisualizeError(f"--tokenizer {tokenizer_dir}: has no decoder, so tokens cannot be drawn")
    from vimpac_jax.training import workdir as workdir_lib
    from vimpac_jax.training.pretrain_step import pretrain_config

    run_config = workdir_lib.read_config_dict(run_dir) if workdir_lib.is_workdir(run_dir) else {}
    store_meta = _train_store_meta(run_config)
    expected = _train_store_tokenizer_hash(store_meta)
    if expected is not None and expected != tokenizer.weights_sha256:
        raise VisualizeError(f"--tokenizer {tokenizer_dir}: not the tokenizer of {run_dir}'s training store "
                             f"(weights sha256 {tokenizer.weights_sha256[:12]}..., the store's {expected[:12]}...)")
    clip_fps = clip_fps_of_run(run_config, store_meta)
    # A model checkpoint records no run: its masks are the pre-training block's definition's.
    num_blocks = mask_blocks or (run_config["pretrain"] if run_config else pretrain_config())["mask_blocks"]
    t, h, w = model_cfg["clip_len"], model_cfg["height"], model_cfg["width"]
    if h != w:
        raise VisualizeError(f"the model's token grid is {h}x{w}; only square frames are drawn")
    size = h * tokenizer.downsample

    (center,) = vd.variants_for("pretrain", size)
    clips, skipped = [], []
    for path in paths:
        if len(clips) == num_videos:
            break
        try:
            frames = vd.decode_variants(path, clip_fps, [center], max_frames=t)[center.name]
        except vd.VideoDecodeError as e:
            skipped.append(f"{path}: {e}")
            continue
        if len(frames) < t:
            skipped.append(f"{path}: {len(frames)} frames at {clip_fps} fps, the model needs {t}")
            continue
        clips.append(frames[:t])
    for line in skipped:
        log.warning("skipped %s", line)
    if not clips:
        raise VisualizeError(f"no usable video among {len(paths)} ({len(skipped)} skipped)")

    _, variables, step = read_exportable(run_dir)  # step: None for a model checkpoint
    rec = reconstruct(build_model(model_cfg), variables, tokenizer, np.stack(clips), jax.random.key(seed), num_blocks)
    image = figure_image(rec, scale=scale)
    plots.write_png(out, image)
    if step is not None:
        plots.write_tensorboard_images(run_dir / "tensorboard", step, {"fig5/reconstruction": image})
    accuracy = float((rec.predicted_tokens == rec.tokens)[rec.mask].mean()) if rec.mask.any() else float("nan")
    return {"out": str(out), "clips": len(clips), "frames": t, "size": size, "skipped": skipped,
            "mask_blocks": num_blocks, "masked": float(rec.mask.mean()), "accuracy": accuracy}
