"""`vimpac visualize --workdir DIR --videos LIST --out FILE.png`: the paper's Fig. 5.

One block of four rows per clip (see `vimpac_jax.visualize`): the original frames, the tokenizer
round-trip, the block mask, and the pre-trained model's prediction of the masked tokens decoded
back to pixels. The first T frames of each video are used (T = the model's clip length), decoded
at the run's clip fps and center-cropped to the tokenizer's frame size.

--workdir is a pre-training workdir (config.json + checkpoints/) or a model checkpoint of a
pre-training model, or a `vimpac demo` workdir (then its pretrain/ and tokenizer_run/tokenizer
are used). --tokenizer names the tokenizer directory otherwise; it must be the one that made the
pre-training tokens (checked against the training store's metadata when that is readable).
Videos that cannot be decoded or are shorter than T frames are skipped and listed. The figure
(`vimpac_jax.visualize.draw_figure`) also goes to a training workdir's TensorBoard log; drawing
needs the `viz` extra (pip install 'vimpac-jax[viz]').
"""

import argparse
import sys
from pathlib import Path

from vimpac_jax.cli import check_output_file
from vimpac_jax.visualize import ROWS, VisualizeError, draw_figure

DEMO_PRETRAIN, DEMO_TOKENIZER = "pretrain", Path("tokenizer_run") / "tokenizer"


def resolve_inputs(workdir: Path, tokenizer: str | None) -> tuple[Path, Path]:
    """-> (pre-training workdir or checkpoint, tokenizer directory); a demo workdir gives both."""
    if not workdir.is_dir():
        raise VisualizeError(f"--workdir {workdir}: no such directory")
    if (workdir / DEMO_PRETRAIN).is_dir() and tokenizer is None and (workdir / DEMO_TOKENIZER).is_dir():
        return workdir / DEMO_PRETRAIN, workdir / DEMO_TOKENIZER
    if tokenizer is None:
        raise VisualizeError(f"--workdir {workdir} is not a `vimpac demo` workdir: name the tokenizer "
                             "that made its tokens with --tokenizer DIR")
    return workdir, Path(tokenizer)


def read_video_paths(videos: str, video_root: str | None) -> list[str]:
    """Paths of a list or directory, read as `vimpac tokenize --videos` reads them."""
    from vimpac_jax.tokenize.lists import read_items

    try:
        return [item.path for item in read_items(videos, video_root)[0]]
    except (OSError, ValueError) as e:
        raise VisualizeError(f"--videos {videos}: {e}") from None


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="vimpac visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="pre-training workdir / checkpoint, or a demo workdir")
    parser.add_argument("--videos", required=True, help="list file ('path [label]' per line) or a directory")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the demo workdir's)")
    parser.add_argument("--video-root", default=None, help="prefix for the list's relative paths (default: as written)")
    parser.add_argument("--num-videos", type=int, default=4, help="clips in the figure (the first N usable)")
    parser.add_argument("--mask-blocks", type=int, default=None, help="blocks per clip (default: the run's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--scale", type=int, default=4, help="pixel enlargement in the figure")
    args = parser.parse_args(argv)
    from vimpac_jax.plots import VizExtraMissing

    try:
        return run(args)
    except (VisualizeError, VizExtraMissing) as e:
        print(f"vimpac visualize: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    if not args.out.lower().endswith(".png"):
        raise VisualizeError(f"--out {args.out}: expected a .png file name")
    check_output_file(args.out)
    for flag in ("num_videos", "scale"):
        if getattr(args, flag) < 1:
            raise VisualizeError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.mask_blocks is not None and args.mask_blocks < 1:
        raise VisualizeError("--mask-blocks must be >= 1")
    run_dir, tokenizer_dir = resolve_inputs(Path(args.workdir), args.tokenizer)
    paths = read_video_paths(args.videos, args.video_root)
    if not paths:
        raise VisualizeError(f"--videos {args.videos}: no videos listed")
    report = draw_figure(run_dir, tokenizer_dir, paths, args.out, num_videos=args.num_videos,
                         mask_blocks=args.mask_blocks, seed=args.seed, scale=args.scale)
    print(f"wrote {args.out}: {report['clips']} clips x {report['frames']} frames at {report['size']} px; rows per "
          f"clip: {', '.join(ROWS)}; masked {report['masked']:.1%} of tokens ({report['mask_blocks']} blocks), "
          f"{report['accuracy']:.1%} of them predicted exactly")
    return 0
