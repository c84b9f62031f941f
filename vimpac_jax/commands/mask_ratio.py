"""`vimpac mask-ratio --clip-len T --tokens N --blocks 4,5,6,7,8 [--samples K] [--seed S]`.

Prints the masking ratio induced by block masking (paper Table 2) for each block count, as
`blocks=B ratio=R` with R in percent, then which count is nearest 15%. The ratio is the mean
masked fraction of K sampled clips (about ±0.05 points at the default 20000), or the exact
expectation with `--exact`.
"""

import argparse


def _grid(text: str) -> tuple:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    h, w = (int(parts[0]),) * 2 if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"grid sizes must be positive, got {text!r}")
    return h, w


def _counts(text: str) -> list:
    try:
        counts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"block counts must be positive, got {text!r}")
    return counts


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="vimpac mask-ratio", description=__doc__.split("\n\n")[1])
    parser.add_argument("--clip-len", type=int, required=True, help="frames per clip (T)")
    parser.add_argument("--tokens", type=_grid, required=True,
                        help="token grid per frame: N (an NxN grid) or HxW, e.g. 16 or 16x16")
    parser.add_argument("--blocks", type=_counts, default=[4, 5, 6, 7, 8],
                        help="comma-separated block counts (default 4,5,6,7,8)")
    parser.add_argument("--samples", type=int, default=20000,
                        help="clips to sample (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact", action="store_true", help="exact expectation, no sampling")
    args = parser.parse_args(argv)
    if args.clip_len < 1 or args.samples < 1:
        parser.error("--clip-len and --samples must be positive")

    import jax  # imported late so that `--help` stays fast

    from vimpac_jax.training import masking

    clip_shape = (args.clip_len, *args.tokens)
    if args.exact:
        ratios = {k: masking.expected_mask_ratio(clip_shape, k) for k in args.blocks}
    else:
        per_clip = args.clip_len * args.tokens[0] * args.tokens[1] * max(args.blocks)  # bytes
        batch_size = max(1, min(args.samples, 1000, 2**26 // per_clip))
        ratios = masking.sampled_mask_ratios(jax.random.PRNGKey(args.seed), clip_shape,
                                             args.blocks, args.samples, batch_size)
    for k in args.blocks:
        print(f"blocks={k} ratio={100 * ratios[k]:.1f}")
    nearest = min(args.blocks, key=lambda k: abs(ratios[k] - 0.15))
    print(f"nearest to 15%: blocks={nearest} ratio={100 * ratios[nearest]:.1f}")
    return 0
