"""The DALL-E discrete VAE (openai/DALL-E `dall_e` package) in Flax linen, NHWC.

Structure and numerics follow the published PyTorch modules (openai/DALL-E `dall_e/`):
- `Conv2d(n_in, n_out, kw)`: odd kernel, explicit padding (kw - 1) // 2, weight
  N(0, 1/sqrt(n_in·kw²)), zero bias.
- a residual block is `id_path(x) + (1 / n_layers²)·res_path(x)`, n_layers = 4·n_blk_per_group;
  res_path = ReLU, conv to width/4, ReLU, conv, ReLU, conv, ReLU, conv to width. The encoder's
  res_path kernels are 3,3,3,1, the decoder's 1,3,3,3.
- Encoder: 7×7 conv, 4 groups at widths n_hid·{1,2,4,8}, 2×2 max-pool after groups 1–3,
  ReLU, 1×1 conv to the vocabulary (8× downsampling).
- Decoder: 1×1 conv from the vocabulary to n_init, 4 groups at widths n_hid·{8,4,2,1},
  nearest ×2 upsampling after groups 1–3, ReLU, 1×1 conv to 2·output_channels.

Parameter names mirror the torch modules: {'input', 'group_{g}_block_{i}': {'id_path',
'conv_1'..'conv_4'}, 'output'}, each {'kernel': [kw, kw, in, out], 'bias': [out]}; see
`vimpac_jax.conversion.dalle.flax_path`. Parameters are float32; `dtype` is the compute type.
The vocabulary convolutions (encoder output, decoder input) always compute in float32, as the
published code does (`use_float16=False`).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LOGIT_LAPLACE_EPS = 0.1
GROUP_COUNT = 4


def map_pixels(x):
    """Pixels in [0, 1] -> [eps, 1 - eps], the encoder's input range. Any shape."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x):
    """Inverse of map_pixels, clamped to [0, 1]. Any shape."""
    return jnp.clip((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class Conv2d(nn.Module):
    """DALL-E's `Conv2d`: [N, H, W, n_in] -> [N, H, W, n_out], stride 1, 'same' odd kernel.

    Integer input [N, H, W] (token ids) is allowed for kw == 1: it equals the convolution of
    the one-hot encoding, computed as a row gather (no [N, H, W, n_in] one-hot tensor).
    """

    n_in: int
    n_out: int
    kw: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        if self.kw % 2 != 1:
            raise ValueError(f"kernel width must be odd, got {self.kw}")
        std = 1.0 / np.sqrt(self.n_in * self.kw ** 2)
        kernel = self.param("kernel", nn.initializers.normal(stddev=std),
                            (self.kw, self.kw, self.n_in, self.n_out), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.n_out,), jnp.float32)
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        if jnp.issubdtype(x.dtype, jnp.integer):
            if self.kw != 1:
                raise ValueError("token input needs a 1x1 convolution")
            return kernel[0, 0][x] + bias
        pad = (self.kw - 1) // 2  # torch's padding=(kw-1)//2, not flax 'SAME'
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        return y + bias


class ResBlock(nn.Module):
    """`id_path(x) + post_gain·res_path(x)`: [N, H, W, n_in] -> [N, H, W, n_out].

    kernels: the four res_path kernel widths ((3, 3, 3, 1) encoder, (1, 3, 3, 3) decoder).
    """

    n_in: int
    n_out: int
    n_layers: int
    kernels: tuple[int, int, int, int]
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        if self.n_out % 4:
            raise ValueError(f"block width {self.n_out} is not a multiple of 4")
        conv = functools.partial(Conv2d, dtype=self.dtype, precision=self.precision)
        n_hid = self.n_out // 4
        identity = conv(self.n_in, self.n_out, 1, name="id_path")(x) if self.n_in != self.n_out else x
        widths = (self.n_in, n_hid, n_hid, n_hid, self.n_out)
        h = x
        for k, kw in enumerate(self.kernels):
            h = conv(widths[k], widths[k + 1], kw, name=f"conv_{k + 1}")(nn.relu(h))
        return identity.astype(h.dtype) + (1.0 / self.n_layers ** 2) * h


class DalleEncoder(nn.Module):
    """Images [N, H, W, input_channels] (map_pixels'd) -> logits [N, H/8, W/8, vocab] float32."""

    n_hid: int = 256
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    input_channels: int = 3
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        n_layers = GROUP_COUNT * self.n_blk_per_group
        x = Conv2d(self.input_channels, self.n_hid, 7, dtype=self.dtype, precision=self.precision,
                   name="input")(x)
        width = self.n_hid
        for g, mult in enumerate((1, 2, 4, 8), start=1):
            for i in range(self.n_blk_per_group):
                x = ResBlock(width, mult * self.n_hid, n_layers, (3, 3, 3, 1), dtype=self.dtype,
                             precision=self.precision, name=f"group_{g}_block_{i + 1}")(x)
                width = mult * self.n_hid
            if g < GROUP_COUNT:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))  # floors odd sizes, like MaxPool2d(2)
        # use_float16=False in the published code: the logits are computed in float32.
        return Conv2d(width, self.vocab_size, 1, dtype=jnp.float32, precision=self.precision,
                      name="output")(nn.relu(x).astype(jnp.float32))


def _upsample_nearest_2x(x):
    """[N, H, W, C] -> [N, 2H, 2W, C], nearest neighbour (torch Upsample(scale_factor=2))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class DalleDecoder(nn.Module):
    """Tokens [N, h, w] int, or a (one-hot) distribution [N, h, w, vocab]
    -> statistics [N, 8h, 8w, 2·output_channels] float32 (the first half are pixel logits)."""

    n_init: int = 128
    n_hid: int = 256
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    output_channels: int = 3
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, z):
        n_layers = GROUP_COUNT * self.n_blk_per_group
        if not jnp.issubdtype(z.dtype, jnp.integer):
            z = z.astype(jnp.float32)
        # use_float16=False for the vocabulary convolution in the published code.
        x = Conv2d(self.vocab_size, self.n_init, 1, dtype=jnp.float32, precision=self.precision,
                   name="input")(z)
        width = self.n_init
        for g, mult in enumerate((8, 4, 2, 1), start=1):
            for i in range(self.n_blk_per_group):
                x = ResBlock(width, mult * self.n_hid, n_layers, (1, 3, 3, 3), dtype=self.dtype,
                             precision=self.precision, name=f"group_{g}_block_{i + 1}")(x)
                width = mult * self.n_hid
            if g < GROUP_COUNT:
                x = _upsample_nearest_2x(x)
        x = Conv2d(width, 2 * self.output_channels, 1, dtype=self.dtype, precision=self.precision,
                   name="output")(nn.relu(x))
        return x.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Tokenizer-level functions. `config` is the dict stored in tokenizer.json:
#   {"encoder": {n_hid, n_blk_per_group, vocab_size, input_channels},
#    "decoder": {n_init, n_hid, n_blk_per_group, vocab_size, output_channels} or None,
#    "vocab_size": V, "downsample": 8}
# `params` is {"encoder": ..., "decoder": ...} (decoder absent when not converted).

ENCODER_FIELDS = ("n_hid", "n_blk_per_group", "vocab_size", "input_channels")
DECODER_FIELDS = ("n_init", "n_hid", "n_blk_per_group", "vocab_size", "output_channels")
# The config of a tokenizer directory (conversion/dalle.py `convert`; decoder None without one).
CONFIG_FIELDS = ("encoder", "decoder", "vocab_size", "downsample")


def make_encoder(config: dict, dtype=jnp.float32) -> DalleEncoder:
    return DalleEncoder(**{k: int(config["encoder"][k]) for k in ENCODER_FIELDS}, dtype=dtype)


def make_decoder(config: dict, dtype=jnp.float32) -> DalleDecoder:
    if not config["decoder"]:
        raise ValueError("this tokenizer was converted without a decoder")
    return DalleDecoder(**{k: int(config["decoder"][k]) for k in DECODER_FIELDS}, dtype=dtype)


def abstract_params(config: dict) -> dict:
    """Shapes/dtypes of {'encoder': ..., 'decoder': ...} for `config`, without allocating."""
    # Traced once per config (tracing the two inits costs ~0.6 CPU-s, on every tokenizer load).
    return jax.tree.map(lambda s: s, _abstract_params(_freeze(config)))


@functools.lru_cache(maxsize=16)
def _abstract_params(frozen_config: str) -> dict:
    config = json.loads(frozen_config)
    out = {}
    enc = make_encoder(config)
    c = enc.input_channels
    out["encoder"] = jax.eval_shape(
        lambda: enc.init(jax.random.key(0), jnp.zeros((1, 8, 8, c), jnp.float32)))["params"]
    if config["decoder"]:
        dec = make_decoder(config)
        out["decoder"] = jax.eval_shape(
            lambda: dec.init(jax.random.key(0), jnp.zeros((1, 1, 1), jnp.int32)))["params"]
    return out


def _freeze(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


@functools.lru_cache(maxsize=16)
def _encode_fn(frozen_config: str, dtype_name: str):
    model = make_encoder(json.loads(frozen_config), jnp.dtype(dtype_name))

    @jax.jit
    def encode(params, images):
        logits = model.apply({"params": params}, map_pixels(images.astype(jnp.float32)))
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits

    return encode


def stats_to_images(stats):
    """Decoder statistics [..., 2C] -> images [..., C] in [0, 1]: the first C are the pixel logits."""
    c = stats.shape[-1] // 2
    return unmap_pixels(jax.nn.sigmoid(stats[..., :c]))


@functools.lru_cache(maxsize=16)
def _decode_fn(frozen_config: str, dtype_name: str, images: bool):
    # With images=True the pixel map runs under the decoder's jit: eagerly, the slice, sigmoid and
    # pixel map compiled a program each per shape.
    model = make_decoder(json.loads(frozen_config), jnp.dtype(dtype_name))

    def decode(params, tokens):
        stats = model.apply({"params": params}, tokens.astype(jnp.int32))
        return stats_to_images(stats) if images else stats

    return jax.jit(decode)


def dalle_encode(params: dict, config: dict, images_nhwc01, dtype=jnp.float32):
    """Images [N, H, W, C] in [0, 1] -> (tokens [N, H/8, W/8] int32, logits [..., V] float32)."""
    return _encode_fn(_freeze(config), jnp.dtype(dtype).name)(params["encoder"], images_nhwc01)


def dalle_decode_stats(params: dict, config: dict, tokens, dtype=jnp.float32):
    """Tokens [N, h, w] int -> decoder statistics [N, 8h, 8w, 2C] float32 (first C: pixel logits)."""
    return _decode_fn(_freeze(config), jnp.dtype(dtype).name, False)(params["decoder"], jnp.asarray(tokens))


def dalle_decode(params: dict, config: dict, tokens, dtype=jnp.float32):
    """Tokens [N, h, w] int -> reconstructed images [N, 8h, 8w, C] in [0, 1] float32."""
    return _decode_fn(_freeze(config), jnp.dtype(dtype).name, True)(params["decoder"], jnp.asarray(tokens))


def load_dalle_tokenizer(directory) -> tuple[dict, dict]:
    """Read a tokenizer directory written by `vimpac convert dalle` -> (config, params)."""
    from vimpac_jax.tokenizer import store  # IO kept out of the model code

    meta, params = store.load_tokenizer(directory, abstract_fn=abstract_params)
    if meta.get("kind") != "dalle":
        raise ValueError(f"{directory}: tokenizer kind is {meta.get('kind')!r}, not 'dalle'")
    missing = [k for k in CONFIG_FIELDS if k not in (meta.get("config") or {})]
    if missing:
        raise ValueError(f"{directory}/{store.META_FILE}: the DALL-E config lacks {missing} (`vimpac convert dalle` "
                         f"writes them all: convert the released pickles again)")
    return meta["config"], params
