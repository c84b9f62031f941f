"""`vimpac codes encode|decode`: frames <-> codes with a tokenizer directory (any kind), on arrays.

(`vimpac tokenize` is the job that turns a video collection into a token store.)

  vimpac codes encode --tokenizer DIR --images IN.npy --out OUT.npz [--no-logits]
      images [N, H, W, 3], float in [0, 1] or uint8 -> tokens int32 [N, h, w], logits float32 [N, h, w, V]
  vimpac codes decode --tokenizer DIR --tokens IN.npy --out OUT.npz
      tokens int [N, h, w] -> images float32 [N, H, W, 3] in [0, 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from vimpac_jax.cli import check_output_file

DTYPES = ("float32", "bfloat16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vimpac codes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tokenizer", required=True, help="tokenizer directory (vimpac convert dalle, or a VQ one)")
    common.add_argument("--out", required=True, help="output .npz")
    common.add_argument("--batch-size", type=int, default=None, help="frames per device step (default 32 per device)")
    common.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype of the network")
    enc = sub.add_parser("encode", parents=[common], help="images -> tokens and logits")
    enc.add_argument("--images", required=True, help=".npy of images [N, H, W, 3], float in [0, 1] or uint8")
    enc.add_argument("--no-logits", action="store_true", help="write only the tokens (logits are N·h·w·V floats)")
    dec = sub.add_parser("decode", parents=[common], help="tokens -> images")
    dec.add_argument("--tokens", required=True, help=".npy of int tokens [N, h, w]")
    return p


def _load_array(path: str, flag: str) -> np.ndarray:
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays, or not an .npy file at all
        raise ValueError(f"{flag} {path}: not a plain .npy array: {e}") from None


def main(argv) -> int:
    args = _parser().parse_args(argv)
    try:
        # Check the input before loading the network: a wrong file should fail in milliseconds.
        # The tokenizer's grid (downsampling, vocabulary, channels) comes from its tokenizer.json.
        check_output_file(args.out)
        source = args.images if args.action == "encode" else args.tokens
        array = _load_array(source, "--images" if args.action == "encode" else "--tokens")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
        import jax.numpy as jnp

        from vimpac_jax.tokenizer import interface

        check = interface.check_images if args.action == "encode" else interface.check_tokens
        array = check(array, interface.read_grid(args.tokenizer), source)
        tok = interface.load_tokenizer(args.tokenizer, dtype=jnp.dtype(args.dtype), batch_size=args.batch_size)
        if args.action == "encode":
            if args.no_logits:
                outputs = {"tokens": tok.encode_tokens(array)}
            else:
                tokens, logits = tok.encode(array)
                outputs = {"tokens": tokens, "logits": logits}
        else:
            outputs = {"images": tok.decode(array)}
    except (ValueError, FileNotFoundError) as e:
        print(f"vimpac codes {args.action}: error: {e}", file=sys.stderr)
        return 2
    np.savez(args.out, **outputs)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in outputs.items()))
    return 0
