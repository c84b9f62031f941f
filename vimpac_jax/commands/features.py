"""`vimpac features --checkpoint DIR --tokens IN.npy --out OUT.npz [--heads]`.

Runs a model checkpoint in eval mode on int token clips [B, T, h, w] and writes `cls` [B, D] and
`hiddens` [B, T, h, w, D]; with --heads also `mlm_logits` [B, T, h, w, V] and `cls_proj`
[B, 256] (pre-training checkpoints); fine-tuning checkpoints also give `logits` [B, classes].
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vimpac_jax import checkpoints
from vimpac_jax.cli import check_output_file, positive_int
from vimpac_jax.runtime.distributed import maybe_initialize
from vimpac_jax.models.config import check_tokens
from vimpac_jax.models.model import build_model


def compute_features(model_config: dict, variables: dict, tokens: np.ndarray, heads: bool,
                     batch_size: int = 64) -> dict[str, np.ndarray]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = build_model(model_config)
    pretrain = model_config["task"] == "pretrain"

    @jax.jit
    def run(batch):
        out = model.apply(variables, batch, train=False)
        keep = ["cls", "hiddens"]
        if pretrain and heads:
            keep += ["mlm_logits", "cls_proj"]
        if not pretrain:
            keep += ["logits"]
        return {k: out[k] for k in keep}

    chunks = [jax.tree.map(np.asarray, run(jnp.asarray(tokens[i:i + batch_size])))
              for i in range(0, len(tokens), batch_size)]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="vimpac features", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a model checkpoint directory (vimpac convert / export)")
    parser.add_argument("--tokens", required=True, help=".npy file of int token clips [B, T, h, w]")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--heads", action="store_true", help="also write mlm_logits and cls_proj")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="clips per model call (default 64)")
    args = parser.parse_args(argv)
    maybe_initialize()
    try:
        check_output_file(args.out)
        config = checkpoints.load_model_config(args.checkpoint)
        if not Path(args.tokens).is_file():
            raise ValueError(f"--tokens {args.tokens}: no such file")
        tokens = check_tokens(np.load(args.tokens, allow_pickle=False), config, args.tokens)
        if len(tokens) == 0:
            raise ValueError(f"{args.tokens}: no clips (B = 0)")
        _, variables = checkpoints.load_model(args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        print(f"vimpac features: error: {e}", file=sys.stderr)
        return 2
    outputs = compute_features(config, variables, tokens, args.heads, args.batch_size)
    np.savez(args.out, **outputs)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()))
    return 0
