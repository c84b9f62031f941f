"""Frames/s of the DALL-E dVAE encoder (the tokenizing step of `vimpac tokenize`) at 128 and 256 px.

Times `Tokenizer` on random uint8 frames, batches sharded over all local devices, after a
compiling warm-up, two ways:
  end-to-end  host uint8 frames -> device -> tokens back on the host, two batches in flight
              (what `vimpac tokenize` does per batch);
  device      frames already on the devices, tokens left there (the network alone).
Without --tokenizer the encoder has the published size (n_hid 256, 2 blocks per group, vocab
8192) and random weights: the speed does not depend on the values. Run it as a module from the repository root (a script named tokenize.py would shadow the
standard library's `tokenize` for everything in its folder):

    python -m benchmarks.tokenize --dtype bfloat16 --batch-size 256 --append-results benchmarks/RESULTS.md

Reference (reference doc §13): the PyTorch DALL-E encoder, fp16 autocast, one H100: 2,130 frames/s
at 128 px, 546 at 256 px.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.pretrain_step import device_name  # noqa: E402
from vimpac_jax.tokenizer import dalle  # noqa: E402
from vimpac_jax.tokenizer.interface import Tokenizer, dalle_backend, load_tokenizer  # noqa: E402

PUBLISHED = {"n_hid": 256, "n_blk_per_group": 2, "vocab_size": 8192, "input_channels": 3}
RESULTS_HEADER = "# Benchmark results\n\nEach benchmark appends a section; newest last.\n"


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", help="a tokenizer directory (default: published-size DALL-E encoder, random weights)")
    p.add_argument("--sizes", default="128,256", help="comma-separated frame sizes in pixels")
    p.add_argument("--batch-size", type=int, default=64, help="frames per step over all local devices")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="compute dtype")
    p.add_argument("--iters", type=int, default=10, help="timed steps per size")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--append-results", help="append a markdown section with the numbers to this file")
    p.add_argument("--note", default="", help="free text for the results section (e.g. the machine's load)")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if any(s < 8 or s % 8 for s in args.sizes):
        p.error("--sizes must be positive multiples of 8")
    for name in ("batch_size", "iters", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} is out of range")
    return args


def published_tokenizer(dtype, batch_size: int) -> Tokenizer:
    """The published-size encoder with random weights (no decoder)."""
    config = {"encoder": dict(PUBLISHED), "decoder": None, "vocab_size": PUBLISHED["vocab_size"], "downsample": 8}
    encoder = dalle.make_encoder(config)
    params = jax.jit(encoder.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3), jnp.float32))["params"]
    return Tokenizer("dalle", dalle_backend(config, {"encoder": params}, dtype), dtype=dtype, batch_size=batch_size)


def time_size(tok: Tokenizer, size: int, iters: int, warmup: int) -> dict:
    """frames/s end-to-end and on-device for frames of size x size, plus the compile time."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (tok.batch_size, size, size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    tok.encode_tokens_async(frames, checked=True).result()  # compiles
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        tok.encode_tokens_async(frames, checked=True).result()

    t0 = time.perf_counter()
    inflight = []
    for _ in range(iters):
        inflight.append(tok.encode_tokens_async(frames, checked=True))
        if len(inflight) > 2:
            inflight.pop(0).result()
    for pending in inflight:
        pending.result()
    end_to_end = iters * len(frames) / (time.perf_counter() - t0)

    on_device = jax.device_put(frames, tok._batch_sharding)
    tok.encode_tokens_device(on_device).block_until_ready()
    t0 = time.perf_counter()
    outs = [tok.encode_tokens_device(on_device) for _ in range(iters)]
    jax.block_until_ready(outs)
    device = iters * len(frames) / (time.perf_counter() - t0)
    return {"size": size, "compile_s": compile_s, "end_to_end": end_to_end, "device": device}


def results_section(args, rows: list[dict], model: str) -> str:
    today = datetime.date.today().isoformat()
    lines = [f"## Tokenizer encoder throughput (`benchmarks/tokenize.py`), {today}", "",
             f"Device: {device_name()}; jax {jax.__version__}; model: {model}; dtype {args.dtype}; "
             f"batch {args.batch_size} frames; {args.iters} timed steps after {args.warmup} warm-up.",
             "Reference: PyTorch DALL-E encoder, fp16, one H100: 2,130 frames/s (128 px), 546 (256 px).", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| size | end-to-end frames/s | on-device frames/s | compile s |", "|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['end_to_end']:.1f} | {r['device']:.1f} | {r['compile_s']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def append_results(path: Path, section: str) -> None:
    """Append a section; create the file with a header if missing (other benchmarks append too)."""
    text = path.read_text() if path.exists() else RESULTS_HEADER
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text + "\n" + section)


def main(argv=None) -> int:
    args = _parse(argv)
    dtype = jnp.dtype(args.dtype)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer, dtype=dtype, batch_size=args.batch_size)
        model = f"{args.tokenizer} ({tok.kind}, vocab {tok.vocab_size})"
    else:
        tok = published_tokenizer(dtype, args.batch_size)
        model = "DALL-E encoder, published size (n_hid 256, 2 blocks/group, vocab 8192), random weights"
    rows = []
    for size in args.sizes:
        row = time_size(tok, size, args.iters, args.warmup)
        rows.append(row)
        print(f"{size} px: {row['end_to_end']:.1f} frames/s end-to-end, {row['device']:.1f} frames/s on device "
              f"(compile {row['compile_s']:.1f} s) [{device_name()}, {args.dtype}, batch {tok.batch_size}]", flush=True)
    section = results_section(args, rows, model)
    if args.append_results:
        append_results(Path(args.append_results), section)
        print(f"appended to {args.append_results}")
    else:
        print("\n" + section)
    return 0



if __name__ == "__main__":
    sys.exit(main())
