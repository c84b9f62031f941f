"""`vimpac convert-store --store DIR --out DIR [--chunk-frames 16] [--shard-options OPTS]`:
rewrite a token store of the old "whole" record layout (one record per (video, variant): every
clip reads its whole video) in the "chunked" layout `vimpac tokenize` writes (records of
--chunk-frames frames: a clip reads at most two). Shards, videos, order, errors.txt and metadata
are kept; --out is published only once complete. The readers refuse the old layout, naming this
command, the only reader of it. See vimpac_jax/data/token_store.py.
"""

from __future__ import annotations

import argparse
import sys

from vimpac_jax.data import token_store


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vimpac convert-store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="a complete token store of the 'whole' layout")
    p.add_argument("--out", required=True, help="the converted store (must not exist)")
    p.add_argument("--chunk-frames", type=int, default=token_store.DEFAULT_CHUNK_FRAMES,
                   help=f"frames per token record (default {token_store.DEFAULT_CHUNK_FRAMES})")
    p.add_argument("--shard-options", default=None,
                   help="ArrayRecordWriter options (default: the store's own, else 'group_size:1')")
    return p


def main(argv) -> int:
    args = _parser().parse_args(argv)
    try:
        meta = token_store.convert_store(args.store, args.out, chunk_frames=args.chunk_frames,
                                         options=args.shard_options)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"vimpac convert-store: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.store} -> {args.out}: {len(meta['shards'])} shards, "
          f"chunk_frames={meta['chunk_frames']}")
    return 0
