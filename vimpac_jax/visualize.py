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
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vimpac_jax.constants import MASK_ID
from vimpac_jax.training.masking import block_mask

ROWS = ("original", "round-trip", "masked", "predicted")
MASK_GREY = 0.5


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
    @jax.jit
    def predict(variables, tokens):
        logits = model.apply(variables, tokens, None, train=False)["mlm_logits"]  # [N, T, h, w, V]
        return jnp.argmax(logits[..., :num_codes], axis=-1).astype(jnp.int32)

    return np.asarray(predict(variables, jnp.asarray(inputs, jnp.int32)))


def reconstruct(model, variables, tokenizer, frames: np.ndarray, key: jax.Array, num_blocks: int) -> Reconstruction:
    """frames uint8 [N, T, H, W, 3] (H, W multiples of the tokenizer's down-sampling) -> the rows.

    `model` is a pre-training model (`build_model` of a pre-training config) whose clip shape is
    [T, H/downsample, W/downsample]; `tokenizer` a loaded `Tokenizer` with a decoder.
    """
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


def figure_image(rec: Reconstruction, *, scale: int = 4, gap: int = 2, clip_gap: int = 8) -> np.ndarray:
    """The rows of every clip tiled into one uint8 image [rows, cols, 3] on a white ground.

    Clip i occupies four rows of `ROWS` order, frames left to right; each frame is enlarged
    `scale` times (nearest neighbour), cells are `gap` pixels apart, clips `clip_gap`.
    """
    n, t, height, width, _ = rec.original.shape
    cell_h, cell_w = height * scale, width * scale
    rows_per_clip = len(ROWS)
    clip_h = rows_per_clip * cell_h + (rows_per_clip - 1) * gap
    out_h = n * clip_h + (n - 1) * clip_gap
    out_w = t * cell_w + (t - 1) * gap
    image = np.full((out_h, out_w, 3), 255, np.uint8)
    for i in range(n):
        for r, row in enumerate((rec.original, rec.roundtrip, rec.masked, rec.predicted)):
            top = i * (clip_h + clip_gap) + r * (cell_h + gap)
            for f in range(t):
                left = f * (cell_w + gap)
                cell = np.clip(np.rint(row[i, f] * 255.0), 0, 255).astype(np.uint8)
                cell = np.repeat(np.repeat(cell, scale, axis=0), scale, axis=1)
                image[top:top + cell_h, left:left + cell_w] = cell
    return image


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> the bytes of an 8-bit RGB PNG (no filter, zlib level 6)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    height, width, _ = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
            + chunk(b"IEND", b""))


def decode_png(data: bytes) -> np.ndarray:
    """The inverse of `encode_png` (8-bit RGB, no filter) -> uint8 [H, W, 3]; for tests and checks."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big")
            if body[8:10] != bytes([8, 2]):
                raise ValueError("only 8-bit RGB PNGs are read")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    if raw[:, 0].any():
        raise ValueError("only unfiltered PNGs are read")
    return raw[:, 1:].reshape(height, width, 3)


def write_png(path, image: np.ndarray) -> None:
    """Writes `encode_png(image)` to `path` through a temporary file, so no half image is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_png(image))
    tmp.replace(path)
