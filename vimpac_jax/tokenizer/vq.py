"""A VQ-VAE image tokenizer trained by this project (an alternative to the DALL-E dVAE).

For users without the DALL-E weights, or with video far from DALL-E's training images. The
encoder and decoder are of the DALL-E dVAE's family (`vimpac_jax.tokenizer.dalle`: the same
`Conv2d` and `ResBlock` modules, 7×7 input conv, four groups of residual blocks, 2×2 max-pool /
nearest ×2 upsampling after groups 1–3, so 8× down-sampling), with configurable widths and a
continuous bottleneck of `embedding_dim` channels that is vector-quantised to `codebook_size`
codes. Images [N, H, W, 3] in [0, 1] (H, W multiples of 8) become tokens [N, H/8, W/8].

Quantisation recipe (van den Oord et al. 2017, appendix; Razavi et al. 2019; Dhariwal et al.
2020 "Jukebox" for restarts) — chosen because it is the standard recipe that trains reliably
without tuning a codebook learning rate:

* Nearest-code assignment by squared Euclidean distance; the decoder sees the code through the
  straight-through estimator `z_e + stop_gradient(z_q - z_e)`, so reconstruction gradients
  reach the encoder unchanged.
* The codebook is *not* trained by gradients. It is an exponential moving average (EMA) of the
  encoder outputs assigned to each code: per code an EMA of the assignment count
  (`cluster_size` [K]) and of the sum of assigned vectors (`embed_sum` [K, D]); the code is
  `embed_sum / cluster_size`, with Laplace (additive ε) smoothing of the counts so that a
  rarely used code never divides by ~0.
* A commitment loss `beta · ||z_e - sg(z_q)||²` keeps encoder outputs near their codes.
* Dead-code restarts: after each EMA update, every code whose EMA count is below
  `restart_threshold` (≈ "fewer than that many vectors per batch lately") is replaced by a
  random encoder output of the current batch, and its EMA state is reset to count =
  threshold, sum = threshold · vector, so that it survives exactly if it then wins at least
  `threshold` vectors per step. Without restarts a large codebook typically collapses to a
  small used fraction.

The codebook statistics live in the flax collection ``'vq_stats'`` ({'quantizer': {'codebook',
'cluster_size', 'embed_sum'}}), next to ``'params'``. This module is the model and its frozen
use (encode, decode, tokenizer directories); the EMA updates, losses and the training step are
in `vimpac_jax.tokenizer.vq_train`.

Pixels: the encoder sees x·2 − 1 ∈ [−1, 1]; the decoder outputs the same scale linearly (no
logit-Laplace distribution as in DALL-E: this tokenizer is trained with a plain squared error).
`recon_mse` and `psnr` are reported on the [0, 1] pixel scale; the training loss is the squared
error on the [−1, 1] scale (4× the reported MSE) plus the commitment loss.

A trained tokenizer is saved as a tokenizer directory (`vimpac_jax.tokenizer.store`) of kind
"vq" whose parameter tree is {'encoder', 'decoder', 'codebook' [K, D]}; `vq_encode` /
`vq_decode` take that tree, like `dalle_encode` / `dalle_decode` take theirs.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vimpac_jax.tokenizer.dalle import Conv2d, ResBlock, _upsample_nearest_2x

KIND = "vq"
DOWNSAMPLE = 8
NUM_GROUPS = 4  # as the dVAE: groups at H, H/2, H/4, H/8 (encoder) and the reverse (decoder)


def to_model_range(images01):
    """Pixels [.., C] in [0, 1] -> [-1, 1], the encoder's input and the decoder's output scale."""
    return images01.astype(jnp.float32) * 2.0 - 1.0


def to_pixels(x):
    """Decoder output on the [-1, 1] scale -> pixels in [0, 1] (clipped)."""
    return jnp.clip((x.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Modules


def _check_widths(widths) -> tuple[int, ...]:
    widths = tuple(int(w) for w in widths)
    if len(widths) != NUM_GROUPS or any(w <= 0 or w % 4 for w in widths):
        raise ValueError(f"widths must be {NUM_GROUPS} positive multiples of 4 (one per group, "
                         f"at H, H/2, H/4, H/8), got {widths}")
    return widths


class VQEncoder(nn.Module):
    """Images [N, H, W, C] on the [-1, 1] scale -> z_e [N, H/8, W/8, embedding_dim] float32.

    The dVAE encoder with per-group widths `widths` (dVAE: n_hid·(1, 2, 4, 8)) and a 1×1
    output conv to the embedding instead of the vocabulary logits.
    """

    widths: tuple[int, ...] = (64, 128, 256, 512)
    n_blk_per_group: int = 2
    embedding_dim: int = 64
    input_channels: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        widths = _check_widths(self.widths)
        n_layers = NUM_GROUPS * self.n_blk_per_group
        x = Conv2d(self.input_channels, widths[0], 7, dtype=self.dtype, name="input")(x)
        width = widths[0]
        for g, w in enumerate(widths, start=1):
            for i in range(self.n_blk_per_group):
                x = ResBlock(width, w, n_layers, (3, 3, 3, 1), dtype=self.dtype,
                             name=f"group_{g}_block_{i + 1}")(x)
                width = w
            if g < NUM_GROUPS:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        # The quantiser's distances are float32, so the bottleneck is computed in float32.
        return Conv2d(width, self.embedding_dim, 1, dtype=jnp.float32, name="output")(
            nn.relu(x).astype(jnp.float32))


class VQDecoder(nn.Module):
    """Quantised z [N, h, w, embedding_dim] -> images [N, 8h, 8w, C] on the [-1, 1] scale
    (float32, unclipped; `to_pixels` maps to [0, 1]).

    The dVAE decoder: 1×1 input conv, groups at the encoder's widths reversed, nearest ×2
    upsampling after groups 1–3, ReLU, 1×1 output conv (C channels, not 2C: no logit-Laplace).
    """

    widths: tuple[int, ...] = (64, 128, 256, 512)  # the encoder's; used reversed
    n_blk_per_group: int = 2
    embedding_dim: int = 64
    output_channels: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        widths = _check_widths(self.widths)[::-1]
        n_layers = NUM_GROUPS * self.n_blk_per_group
        x = Conv2d(self.embedding_dim, widths[0], 1, dtype=self.dtype, name="input")(z)
        width = widths[0]
        for g, w in enumerate(widths, start=1):
            for i in range(self.n_blk_per_group):
                x = ResBlock(width, w, n_layers, (1, 3, 3, 3), dtype=self.dtype,
                             name=f"group_{g}_block_{i + 1}")(x)
                width = w
            if g < NUM_GROUPS:
                x = _upsample_nearest_2x(x)
        x = Conv2d(width, self.output_channels, 1, dtype=self.dtype, name="output")(nn.relu(x))
        return x.astype(jnp.float32)


def code_logits(z, codebook):
    """Negative squared distances: z [..., D], codebook [K, D] -> [..., K] float32.

    logits[..., k] = -||z - codebook[k]||², so argmax is the nearest code and softmax(logits)
    is a Gaussian-kernel soft assignment. Computed as 2 z·e - |z|² - |e|² at full float32
    precision (TPU's default bf16 matmul passes could flip near-ties of the argmax).
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    dots = jnp.einsum("...d,kd->...k", z, codebook, precision=jax.lax.Precision.HIGHEST)
    return 2.0 * dots - jnp.sum(z * z, -1, keepdims=True) - jnp.sum(codebook * codebook, -1)


def quantize(z, codebook):
    """z [..., D] -> (tokens [...] int32, logits [..., K], z_q [..., D] = codebook[tokens])."""
    logits = code_logits(z, codebook)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, logits, jnp.take(codebook, tokens, axis=0)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with an EMA codebook held in the 'vq_stats' collection.

    __call__(z [..., D]) -> dict(tokens [...] int32, logits [..., K] (negative squared
    distances), z_q [..., D] (the codes), z_st [..., D] (straight-through: value z_q,
    gradient of z)). The statistics are read here and updated outside the module by the pure
    `ema_update` / `restart_dead_codes`.
    """

    codebook_size: int = 8192
    embedding_dim: int = 64

    @nn.compact
    def __call__(self, z):
        k, d = self.codebook_size, self.embedding_dim
        # Same scale as a fresh encoder's outputs; restarts replace unused codes anyway.
        init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
        codebook = self.variable("vq_stats", "codebook",
                                 lambda: init(self.make_rng("params"), (k, d), jnp.float32))
        self.variable("vq_stats", "cluster_size", lambda: jnp.ones((k,), jnp.float32))
        # A copy: one buffer in two leaves breaks buffer donation of the training state.
        self.variable("vq_stats", "embed_sum", lambda: jnp.copy(codebook.value))
        tokens, logits, z_q = quantize(z, codebook.value)
        z_st = z + jax.lax.stop_gradient(z_q - z)
        return dict(tokens=tokens, logits=logits, z_q=z_q, z_st=z_st)


class VQTokenizer(nn.Module):
    """Encoder + quantiser + decoder. __call__(images01 [N, H, W, C] in [0, 1]) -> dict with
    z_e [N, h, w, D], tokens [N, h, w], logits [N, h, w, K], z_q, recon [N, H, W, C] on the
    [-1, 1] scale (h = H/8). `decode_codes(z [N, h, w, D])` runs the decoder alone."""

    codebook_size: int = 8192
    embedding_dim: int = 64
    widths: tuple[int, ...] = (64, 128, 256, 512)
    n_blk_per_group: int = 2
    channels: int = 3
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = VQEncoder(self.widths, self.n_blk_per_group, self.embedding_dim, self.channels,
                                 dtype=self.dtype)
        self.quantizer = VectorQuantizer(self.codebook_size, self.embedding_dim)
        self.decoder = VQDecoder(self.widths, self.n_blk_per_group, self.embedding_dim, self.channels,
                                 dtype=self.dtype)

    def __call__(self, images01):
        z_e = self.encoder(to_model_range(images01))
        q = self.quantizer(z_e)
        recon = self.decoder(q["z_st"])
        return dict(z_e=z_e, tokens=q["tokens"], logits=q["logits"], z_q=q["z_q"], recon=recon)

    def decode_codes(self, z):
        return self.decoder(z)


# ---------------------------------------------------------------------------------------------
# Configuration. The model block (`config.model` in configs/tokenizer.py, and "config" in
# tokenizer.json) is a flat mapping of MODEL_FIELDS.

MODEL_FIELDS = ("codebook_size", "embedding_dim", "widths", "n_blk_per_group", "channels")


def model_json_config(model_config: Mapping) -> dict:
    """The model block -> the JSON-able dict stored in tokenizer.json (adds vocab_size and
    downsample, the keys every tokenizer kind's config has). Validates the fields."""
    missing = [f for f in MODEL_FIELDS if f not in model_config]
    if missing:
        raise ValueError(f"tokenizer config lacks field(s) {missing}; needs {list(MODEL_FIELDS)}")
    out = {f: model_config[f] for f in MODEL_FIELDS}
    out["widths"] = list(_check_widths(out["widths"]))
    for f in ("codebook_size", "embedding_dim", "n_blk_per_group", "channels"):
        out[f] = int(out[f])
        if out[f] <= 0:
            raise ValueError(f"tokenizer.{f} must be positive, got {out[f]}")
    out["vocab_size"] = out["codebook_size"]
    out["downsample"] = DOWNSAMPLE
    return out


def make_model(model_config: Mapping, dtype=jnp.float32) -> VQTokenizer:
    c = model_json_config(model_config)
    return VQTokenizer(codebook_size=c["codebook_size"], embedding_dim=c["embedding_dim"],
                       widths=tuple(c["widths"]), n_blk_per_group=c["n_blk_per_group"],
                       channels=c["channels"], dtype=jnp.dtype(dtype))


def init_variables(model_config: Mapping, key, dtype=jnp.float32) -> dict:
    """{'params': {'encoder', 'decoder'}, 'vq_stats': {'quantizer': {...}}} for `model_config`."""
    model = make_model(model_config, dtype)
    dummy = jnp.zeros((1, DOWNSAMPLE, DOWNSAMPLE, model.channels), jnp.float32)
    # jit: one compilation instead of one per primitive (eager init costs tens of seconds).
    return dict(jax.jit(model.init)({"params": key}, dummy))


def tokenizer_params(params, vq_stats) -> dict:
    """Training variables -> the frozen tokenizer tree {'encoder', 'decoder', 'codebook' [K, D]}
    that `vq_encode`, `vq_decode` and the tokenizer directory use."""
    return {"encoder": params["encoder"], "decoder": params["decoder"],
            "codebook": vq_stats["quantizer"]["codebook"]}


def abstract_params(config: Mapping) -> dict:
    """Shapes/dtypes of the tokenizer tree for a tokenizer.json config, without allocating."""
    # Traced once per config (tracing the init costs ~0.3 CPU-s, on every tokenizer load).
    return jax.tree.map(lambda s: s, _abstract_params(_freeze(config)))


@functools.lru_cache(maxsize=16)
def _abstract_params(frozen_config: str) -> dict:
    variables = jax.eval_shape(lambda: init_variables(json.loads(frozen_config), jax.random.key(0)))
    return tokenizer_params(variables["params"], variables["vq_stats"])


# ---------------------------------------------------------------------------------------------
# Frozen-tokenizer functions (the interface shared with the dVAE).


def _freeze(config: Mapping) -> str:
    return json.dumps(model_json_config(config), sort_keys=True)


def _check_images(images) -> None:
    if images.ndim != 4 or images.shape[1] % DOWNSAMPLE or images.shape[2] % DOWNSAMPLE:
        raise ValueError(f"images must be [N, H, W, C] with H and W multiples of {DOWNSAMPLE}, "
                         f"got shape {tuple(images.shape)}")


def encode_logits_fn(config: Mapping, dtype=jnp.float32):
    """A pure, jittable fn(tok_params, images01 [N, H, W, C]) -> logits [N, H/8, W/8, K] float32
    (negative squared distances to the codes; argmax = token) for tokenizers of `config`."""
    model = make_model(config, dtype)

    def encode_logits(tok_params, images01):
        z = model.apply({"params": {"encoder": tok_params["encoder"]}}, to_model_range(images01),
                        method=lambda m, x: m.encoder(x))
        return code_logits(z, tok_params["codebook"])

    return encode_logits


def decode_images_fn(config: Mapping, dtype=jnp.float32):
    """A pure, jittable fn(tok_params, tokens [N, h, w] int) -> images [N, 8h, 8w, C] in [0, 1]."""
    model = make_model(config, dtype)

    def decode_images(tok_params, tokens):
        z = jnp.take(tok_params["codebook"], tokens.astype(jnp.int32), axis=0)
        out = model.apply({"params": {"decoder": tok_params["decoder"]}}, z, method=VQTokenizer.decode_codes)
        return to_pixels(out)

    return decode_images


@functools.lru_cache(maxsize=16)
def _encode_fn(frozen_config: str, dtype_name: str):
    encode_logits = encode_logits_fn(json.loads(frozen_config), dtype_name)

    @jax.jit
    def encode(tok_params, images):
        if jnp.issubdtype(images.dtype, jnp.integer):
            images = images.astype(jnp.float32) / 255.0
        logits = encode_logits(tok_params, images)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits

    return encode


@functools.lru_cache(maxsize=16)
def _decode_fn(frozen_config: str, dtype_name: str):
    return jax.jit(decode_images_fn(json.loads(frozen_config), dtype_name))


def vq_encode(tok_params: Mapping, config: Mapping, images01, dtype=jnp.float32):
    """Images [N, H, W, C] in [0, 1] (or uint8 0..255) -> (tokens [N, H/8, W/8] int32,
    logits [N, H/8, W/8, K] float32).

    `tok_params` is the tokenizer tree {'encoder', 'decoder', 'codebook'} (`tokenizer_params`
    or `load_vq_tokenizer`). logits are negative squared distances to the codes, so
    argmax(logits) == tokens (the nearest code); they are not normalised log-probabilities.
    """
    images01 = jnp.asarray(images01)
    _check_images(images01)
    return _encode_fn(_freeze(config), jnp.dtype(dtype).name)(tok_params, images01)


def vq_decode(tok_params: Mapping, config: Mapping, tokens, dtype=jnp.float32):
    """Tokens [N, h, w] int -> reconstructed images [N, 8h, 8w, C] in [0, 1] float32."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 3 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer [N, h, w], got {tokens.dtype} {tuple(tokens.shape)}")
    return _decode_fn(_freeze(config), jnp.dtype(dtype).name)(tok_params, tokens)


# ---------------------------------------------------------------------------------------------
# Tokenizer directories


def save_vq_tokenizer(directory, model_config: Mapping, state, *, overwrite: bool = False,
                      metadata: Mapping | None = None):
    """Write a tokenizer directory of kind 'vq' (see `vimpac_jax.tokenizer.store`) from a training
    state (a `vq_train.VQTrainState`: its `tokenizer_params()` and `step`): tokenizer.json
    {"kind": "vq", "config": model_json_config(model_config), "step", "metadata"} and the tree
    {'encoder', 'decoder', 'codebook'} as float32 numpy arrays."""
    from vimpac_jax.tokenizer import store  # IO kept out of the model code

    config = model_json_config(model_config)
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32), state.tokenizer_params())
    expected = jax.tree.map(lambda s: (s.shape, s.dtype), abstract_params(config))
    got = jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    if got != expected:
        raise ValueError("the training state does not match the tokenizer config (different "
                         "widths / codebook_size / embedding_dim?)")
    meta = {"kind": KIND, "config": config, "step": int(np.asarray(state.step))}
    if metadata:
        meta["metadata"] = dict(metadata)
    return store.save_tokenizer(directory, meta, tree, overwrite=overwrite)


def load_vq_tokenizer(directory) -> tuple[dict, dict]:
    """Read a tokenizer directory of kind 'vq' -> (config, {'encoder', 'decoder', 'codebook'})."""
    from vimpac_jax.tokenizer import store

    meta = store.read_meta(directory)
    if meta.get("kind") != KIND:
        raise ValueError(f"{directory}: tokenizer kind is {meta.get('kind')!r}, not {KIND!r}")
    meta, params = store.load_tokenizer(directory, abstract_fn=abstract_params)
    return meta["config"], params
