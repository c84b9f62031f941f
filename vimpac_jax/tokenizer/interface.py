"""One interface over every image tokenizer kind: `load_tokenizer(dir) -> Tokenizer`.

A tokenizer maps RGB frames to a grid of integer codes and back:
  encode: images [N, H, W, C] in [0, 1] (float) or 0..255 (uint8)
          -> tokens int32 [N, H/f, W/f], logits float32 [N, H/f, W/f, V]  (tokens = argmax logits)
  decode: tokens int [N, h, w] -> images float32 [N, f·h, f·w, C] in [0, 1]
with f the downsampling factor (8 for DALL-E) and V the vocabulary size.

Kinds are registered in `TOKENIZER_KINDS`: `kind -> TokenizerKind(load, grid)`, chosen by the
"kind" field of the directory's tokenizer.json. To add a kind, write a factory that loads the
directory and returns a `TokenizerBackend` (pure jittable encode/decode functions plus their
parameters) and a function that reads its `TokenizerGrid` from the config, and add one entry to
the dict; nothing else changes.

Batches are sharded over the local devices (a 1-D mesh, axis 'data', parameters replicated), so
every chip of the host works on a slice of each batch. Each call is cut into batches of at most
`batch_size` frames; the last, short one is padded to a power-of-two bucket (a multiple of the
device count), so a job sees at most log2(batch_size) + 1 compiled shapes per frame size.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vimpac_jax.tokenizer import store

DEFAULT_PER_DEVICE_BATCH = 32
DATA_AXIS = "data"

EncodeLogitsFn = Callable[[Any, jax.Array], jax.Array]
DecodeImagesFn = Callable[[Any, jax.Array], jax.Array]


class TokenizerLoadError(ValueError):
    """A tokenizer directory is missing, of an unknown kind, or does not load."""


@dataclasses.dataclass(frozen=True)
class TokenizerGrid:
    """What a tokenizer expects of its inputs, read from tokenizer.json alone (`read_grid`): images
    [N, H, W, input_channels] with H and W multiples of `downsample`; token ids in [0, vocab_size)."""

    downsample: int
    vocab_size: int
    input_channels: int


@dataclasses.dataclass(frozen=True)
class TokenizerBackend:
    """What one tokenizer kind provides to `Tokenizer`.

    The functions must depend on `config` only (parameters come in as arguments): `Tokenizer`
    reuses their compiled form for every tokenizer of the same kind and config.

    encode_logits(params, images01) -> logits: images float32 [N, H, W, C] in [0, 1] ->
      float32 [N, H/f, W/f, V], scores whose argmax is the token (a VQ tokenizer returns e.g.
      minus the squared distance to each code). Pure and traceable: it runs under jax.jit.
    decode_images(params, tokens) -> images: int32 [N, h, w] -> float32 [N, f·h, f·w, C] in [0, 1];
      None when the tokenizer has no decoder.
    config: the JSON-able description stored in tokenizer.json (part of a token store's identity).
    grid: what the functions expect of their inputs (the kind's `grid(config)`).
    """

    config: dict
    params: Any
    grid: TokenizerGrid
    encode_logits: EncodeLogitsFn
    decode_images: DecodeImagesFn | None


# ---------------------------------------------------------------------------------------------
# Kinds


def _dalle_grid(config: dict) -> TokenizerGrid:
    return TokenizerGrid(int(config["downsample"]), int(config["vocab_size"]), int(config["encoder"]["input_channels"]))


def _vq_grid(config: dict) -> TokenizerGrid:
    return TokenizerGrid(int(config["downsample"]), int(config["vocab_size"]), int(config["channels"]))


def dalle_backend(config: dict, params: dict, dtype=jnp.float32) -> TokenizerBackend:
    """A DALL-E dVAE (`vimpac_jax.tokenizer.dalle`) from its config and {'encoder', 'decoder'} params."""
    from vimpac_jax.tokenizer import dalle

    encoder = dalle.make_encoder(config, dtype)

    def encode_logits(p, images01):
        return encoder.apply({"params": p["encoder"]}, dalle.map_pixels(images01))

    decode_images = None
    if config["decoder"] and "decoder" in params:
        decoder = dalle.make_decoder(config, dtype)

        def decode_images(p, tokens):
            return dalle.stats_to_images(decoder.apply({"params": p["decoder"]}, tokens))

    return TokenizerBackend(config=config, params=params, grid=_dalle_grid(config), encode_logits=encode_logits,
                            decode_images=decode_images)


def _load_dalle(directory: Path, meta: dict, dtype) -> TokenizerBackend:
    from vimpac_jax.tokenizer import dalle

    config, params = dalle.load_dalle_tokenizer(directory)
    return dalle_backend(config, params, dtype)


def _load_vq(directory: Path, meta: dict, dtype) -> TokenizerBackend:
    """A VQ-VAE trained by this project (`vimpac_jax.tokenizer.vq`, configs/tokenizer.py); `meta` is
    not needed: `load_vq_tokenizer` reads and checks it."""
    from vimpac_jax.tokenizer import vq

    config, params = vq.load_vq_tokenizer(directory)
    return TokenizerBackend(config=config, params=params, grid=_vq_grid(config),
                            encode_logits=vq.encode_logits_fn(config, dtype),
                            decode_images=vq.decode_images_fn(config, dtype))


@dataclasses.dataclass(frozen=True)
class TokenizerKind:
    """One entry of TOKENIZER_KINDS: load(directory, meta, dtype) -> TokenizerBackend (imports its
    model lazily, so that loading one kind never needs another's code), and grid(config) ->
    TokenizerGrid from tokenizer.json's config alone (inputs are checked before any weight loads)."""

    load: Callable[[Path, dict, Any], TokenizerBackend]
    grid: Callable[[dict], TokenizerGrid]


# kind (tokenizer.json "kind") -> TokenizerKind.
TOKENIZER_KINDS: dict[str, TokenizerKind] = {
    "dalle": TokenizerKind(load=_load_dalle, grid=_dalle_grid),
    "vq": TokenizerKind(load=_load_vq, grid=_vq_grid),
}


# ---------------------------------------------------------------------------------------------
# The tokenizer

# (kind, config, dtype, has decoder, devices) -> jitted (encode_full, encode_tokens, decode). A kind's functions
# depend only on its config (parameters are arguments), so tokenizers loaded again, or with other
# weights of the same shape, reuse the compiled executables instead of compiling anew.
_JIT_CACHE: dict[tuple, tuple] = {}


def local_mesh(devices=None) -> Mesh:
    """A 1-D mesh ('data',) over this process's devices (default: jax.local_devices())."""
    devices = list(jax.local_devices() if devices is None else devices)
    # Auto axes: plain jit sharding propagation (newer jax defaults some meshes to Explicit).
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def bucket_size(n: int, batch_size: int, n_devices: int) -> int:
    """Padded length for a chunk of n <= batch_size rows: the next power of two, at least the device
    count, rounded up to a multiple of it, at most batch_size (itself a multiple of the device count)."""
    size = max(n_devices, _next_pow2(n))
    size = -(-size // n_devices) * n_devices
    return min(size, batch_size)


class PendingTokens:
    """Tokens of a dispatched batch, still being computed on the devices; `result()` waits."""

    def __init__(self, chunks: list[tuple[jax.Array, int]], empty_shape: tuple[int, ...]):
        self._chunks = chunks
        self._empty_shape = empty_shape

    def result(self) -> np.ndarray:
        """int32 [N, h, w] on the host."""
        if not self._chunks:
            return np.zeros(self._empty_shape, np.int32)
        return np.concatenate([np.asarray(out)[:n] for out, n in self._chunks])


class Tokenizer:
    """A loaded tokenizer: `encode` frames into tokens, `decode` tokens into frames (see module doc).

    Attributes: kind, config, params (replicated on the mesh), grid (TokenizerGrid; its
    downsample, vocab_size and input_channels are properties here too), weights_sha256 (None when
    not loaded from a directory), dtype (compute dtype), mesh, batch_size (frames per device step,
    over all local devices).
    """

    def __init__(self, kind: str, backend: TokenizerBackend, *, weights_sha256: str | None = None,
                 dtype=jnp.float32, batch_size: int | None = None, devices=None,
                 directory: str | None = None):
        self.kind = kind
        self.config = backend.config
        self.grid = backend.grid
        self.weights_sha256 = weights_sha256
        self.dtype = jnp.dtype(dtype)
        self.directory = directory
        self.mesh = local_mesh(devices)
        n_dev = self.mesh.size
        batch_size = DEFAULT_PER_DEVICE_BATCH * n_dev if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = -(-batch_size // n_dev) * n_dev  # every device gets the same share
        self._replicated = NamedSharding(self.mesh, P())
        self._batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        self.params = jax.device_put(backend.params, self._replicated)
        self._has_decoder = backend.decode_images is not None

        key = (kind, json.dumps(self.config, sort_keys=True), self.dtype.name, self._has_decoder,
               tuple(d.id for d in self.mesh.devices.flat))
        if key not in _JIT_CACHE:
            _JIT_CACHE[key] = self._make_jitted(backend)
        self._encode_full, self._encode_tokens, self._decode = _JIT_CACHE[key]

    def _make_jitted(self, backend: TokenizerBackend):
        encode_logits, decode_images = backend.encode_logits, backend.decode_images

        def to_unit(images):
            # uint8 travels to the device as bytes (4x less traffic) and is scaled there.
            if jnp.issubdtype(images.dtype, jnp.integer):
                return images.astype(jnp.float32) / 255.0
            return images.astype(jnp.float32)

        def encode_full(params, images):
            logits = encode_logits(params, to_unit(images)).astype(jnp.float32)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits

        def encode_tokens(params, images):
            logits = encode_logits(params, to_unit(images))
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)

        shard, rep = self._batch_sharding, self._replicated
        # jax caches one executable per (bucket, frame size, input dtype) of each function.
        full = jax.jit(encode_full, in_shardings=(rep, shard), out_shardings=(shard, shard))
        tokens = jax.jit(encode_tokens, in_shardings=(rep, shard), out_shardings=shard)
        decode = None
        if decode_images is not None:
            decode = jax.jit(lambda params, t: decode_images(params, t).astype(jnp.float32),
                             in_shardings=(rep, shard), out_shardings=shard)
        return full, tokens, decode

    # -- identity ----------------------------------------------------------------------------

    def identity(self) -> dict:
        """What determines the tokens: kind, config, weights hash and compute dtype."""
        return {"kind": self.kind, "config": self.config, "weights_sha256": self.weights_sha256,
                "compute_dtype": self.dtype.name}

    def token_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.downsample, width // self.downsample

    # -- checks --------------------------------------------------------------------------------

    def check_images(self, images, source: str = "images") -> np.ndarray:
        return check_images(images, self.grid, source)

    def check_tokens(self, tokens, source: str = "tokens") -> np.ndarray:
        return check_tokens(tokens, self.grid, source)

    # -- batched device calls ------------------------------------------------------------------

    def _chunks(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(n, start + self.batch_size)

    def _put(self, array: np.ndarray) -> jax.Array:
        """Pad rows to the bucket and place the batch sharded over the mesh."""
        n = len(array)
        size = bucket_size(n, self.batch_size, self.mesh.size)
        if size != n:
            array = np.concatenate([array, np.zeros((size - n, *array.shape[1:]), array.dtype)])
        return jax.device_put(array, self._batch_sharding)

    def encode(self, images) -> tuple[np.ndarray, np.ndarray]:
        """images [N, H, W, C] (float in [0, 1] or uint8) -> (tokens int32 [N, h, w], logits float32 [N, h, w, V]).

        The logits are V floats per token (8192 for DALL-E: 32 MiB per 256 px frame); use
        `encode_tokens` when only the tokens are wanted.
        """
        images = self.check_images(images)
        h, w = self.token_hw(*images.shape[1:3])
        if len(images) == 0:
            return np.zeros((0, h, w), np.int32), np.zeros((0, h, w, self.vocab_size), np.float32)
        tokens, logits = [], []
        for a, b in self._chunks(len(images)):
            t, l = self._encode_full(self.params, self._put(images[a:b]))
            tokens.append(np.asarray(t)[:b - a])
            logits.append(np.asarray(l)[:b - a])
        return np.concatenate(tokens), np.concatenate(logits)

    def encode_tokens_async(self, images, *, checked: bool = False) -> PendingTokens:
        """Dispatch images [N, H, W, C] to the devices and return at once; `.result()` -> int32 [N, h, w].

        Lets a caller prepare the next batch while this one runs. `checked=True` skips the input
        checks (the caller built the batch itself).
        """
        images = np.asarray(images) if checked else self.check_images(images)
        h, w = self.token_hw(*images.shape[1:3])
        chunks = [(self._encode_tokens(self.params, self._put(images[a:b])), b - a)
                  for a, b in self._chunks(len(images))]
        return PendingTokens(chunks, (0, h, w))

    def encode_tokens_device(self, images: jax.Array) -> jax.Array:
        """Frames already on the devices [B, H, W, C] (B a multiple of the device count, at most
        batch_size; uint8 or float in [0, 1]) -> tokens int32 [B, h, w], left on the devices,
        unchecked. For callers that keep the frames on the chips (benchmarks)."""
        return self._encode_tokens(self.params, jax.device_put(images, self._batch_sharding))

    def encode_tokens(self, images) -> np.ndarray:
        """images [N, H, W, C] -> tokens int32 [N, h, w] (no logits leave the device)."""
        return self.encode_tokens_async(images).result()

    def decode(self, tokens) -> np.ndarray:
        """tokens int [N, h, w] -> images float32 [N, f·h, f·w, C] in [0, 1]."""
        if not self._has_decoder:
            raise ValueError(f"this {self.kind} tokenizer has no decoder (it was converted without one)")
        tokens = self.check_tokens(tokens)
        n, h, w = tokens.shape
        if n == 0:
            f = self.downsample
            return np.zeros((0, f * h, f * w, self.input_channels), np.float32)
        return np.concatenate([np.asarray(self._decode(self.params, self._put(tokens[a:b])))[:b - a]
                               for a, b in self._chunks(n)])

    @property
    def has_decoder(self) -> bool:
        return self._has_decoder

    @property
    def downsample(self) -> int:
        return self.grid.downsample

    @property
    def vocab_size(self) -> int:
        return self.grid.vocab_size

    @property
    def input_channels(self) -> int:
        return self.grid.input_channels


def check_images(images, grid: TokenizerGrid, source: str = "images") -> np.ndarray:
    """A clear ValueError for input that is not [N, H, W, C] uint8 / float in [0, 1]."""
    images = np.asarray(images)
    c, f = grid.input_channels, grid.downsample
    if images.ndim != 4 or images.shape[-1] != c:
        raise ValueError(f"{source}: expected images [N, H, W, {c}], got shape {list(images.shape)}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{source}: expected uint8 (0..255) or float (0..1) images, got dtype {images.dtype}")
    h, w = images.shape[1:3]
    if h < f or w < f or h % f or w % f:
        raise ValueError(f"{source}: height and width must be positive multiples of {f} "
                         f"(the tokenizer's downsampling), got {h}x{w}")
    if images.size and np.issubdtype(images.dtype, np.floating):
        lo, hi = float(np.min(images)), float(np.max(images))
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise ValueError(f"{source}: float images must lie in [0, 1], found values in [{lo}, {hi}] "
                             "(uint8 images are divided by 255)")
    return images


def check_tokens(tokens, grid: TokenizerGrid, source: str = "tokens") -> np.ndarray:
    """A clear ValueError for input that is not integer ids [N, h, w] in [0, vocab_size) -> int32."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"{source}: expected tokens [N, h, w], got shape {list(tokens.shape)}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{source}: tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= grid.vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= grid.vocab_size)]
        raise ValueError(f"{source}: token ids must be in [0, {grid.vocab_size}); found {bad.flat[0]} "
                         f"({bad.size} ids out of range)")
    return tokens.astype(np.int32)


def _read_kind(path: Path) -> tuple[str, dict]:
    """(kind, meta) of a tokenizer directory, or TokenizerLoadError naming it."""
    try:
        meta = store.read_meta(path)
    except FileNotFoundError as e:
        raise TokenizerLoadError(str(e)) from None
    except ValueError as e:  # broken JSON
        raise TokenizerLoadError(f"{path}: unreadable {store.META_FILE}: {e}") from None
    kind = meta.get("kind")
    if kind not in TOKENIZER_KINDS:
        raise TokenizerLoadError(f"{path}: unknown tokenizer kind {kind!r} in {store.META_FILE}; "
                                 f"known kinds: {sorted(TOKENIZER_KINDS)}")
    return kind, meta


def read_grid(directory) -> TokenizerGrid:
    """The TokenizerGrid of a tokenizer directory from its tokenizer.json alone (no weights read):
    for checking inputs before `load_tokenizer`."""
    path = Path(directory)
    kind, meta = _read_kind(path)
    try:
        return TOKENIZER_KINDS[kind].grid(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise TokenizerLoadError(f"{path}/{store.META_FILE}: the {kind} config lacks or misstates {e}") from None


def load_tokenizer(directory, *, dtype=jnp.float32, batch_size: int | None = None, devices=None) -> Tokenizer:
    """Load a tokenizer directory (tokenizer.json + params/) of any registered kind.

    dtype: compute dtype of the network (float32, or bfloat16 for speed; logits stay float32).
    batch_size: frames per device step over all local devices (default 32 per device).
    Raises TokenizerLoadError (a ValueError) with the directory's name when it does not load.
    """
    path = Path(directory)
    kind, meta = _read_kind(path)
    try:
        backend = TOKENIZER_KINDS[kind].load(path, meta, dtype)
    except TokenizerLoadError:
        raise
    except Exception as e:  # orbax/IO/shape errors come in many types; name the directory
        raise TokenizerLoadError(f"{path}: cannot load the {kind} tokenizer: {type(e).__name__}: {e}") from e
    return Tokenizer(kind, backend, weights_sha256=meta.get("weights_sha256"), dtype=dtype,
                     batch_size=batch_size, devices=devices, directory=str(path))
