"""`vimpac visualize --workdir DIR --videos LIST --out FILE.png`: the paper's Fig. 5.

One block of four rows per clip (see `vimpac_jax.visualize`): the original frames, the tokenizer
round-trip, the block mask, and the pre-trained model's prediction of the masked tokens decoded
back to pixels. The first T frames of each video are used (T = the model's clip length), decoded
at the run's clip fps and center-cropped to the tokenizer's frame size.

--workdir is a pre-training workdir (config.json + checkpoints/) or a model checkpoint of a
pre-training model, or a `vimpac demo` workdir (then its pretrain/ and tokenizer_run/tokenizer
are used). --tokenizer names the tokenizer directory otherwise; it must be the one that made the
pre-training tokens (checked against the training store's metadata when that is readable).
Videos that cannot be decoded or are shorter than T frames are skipped and listed.
"""

import argparse
import json
import sys
from pathlib import Path

DEMO_PRETRAIN, DEMO_TOKENIZER = "pretrain", Path("tokenizer_run") / "tokenizer"


class VisualizeError(ValueError):
    pass


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


def _train_store_tokenizer_hash(run_config: dict) -> str | None:
    """The weights hash the run's training store was tokenized with, if the store is readable."""
    try:
        meta = json.loads((Path(run_config["data"]["train_store"]) / "metadata.json").read_text())
        return meta["tokenizer"]["weights_sha256"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def read_video_paths(videos: str, video_root: str | None) -> list[str]:
    """Paths of a list or directory, read as `vimpac tokenize --videos` reads them."""
    from vimpac_jax.data.tokenize import read_items

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
    try:
        return run(args)
    except VisualizeError as e:
        print(f"vimpac visualize: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    if not args.out.lower().endswith(".png"):
        raise VisualizeError(f"--out {args.out}: expected a .png file name")
    for flag in ("num_videos", "scale"):
        if getattr(args, flag) < 1:
            raise VisualizeError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.mask_blocks is not None and args.mask_blocks < 1:
        raise VisualizeError("--mask-blocks must be >= 1")
    run_dir, tokenizer_dir = resolve_inputs(Path(args.workdir), args.tokenizer)
    paths = read_video_paths(args.videos, args.video_root)
    if not paths:
        raise VisualizeError(f"--videos {args.videos}: no videos listed")

    import jax
    import numpy as np

    from vimpac_jax import visualize
    from vimpac_jax.data import video_decode as vd
    from vimpac_jax.export.source import ExportSourceError, load_exportable, load_model_config
    from vimpac_jax.models.model import build_model
    from vimpac_jax.tokenizer.interface import TokenizerLoadError, load_tokenizer

    try:
        model_cfg = load_model_config(run_dir)
    except ExportSourceError as e:
        raise VisualizeError(str(e)) from None
    if model_cfg.get("task", "pretrain") != "pretrain":
        raise VisualizeError(f"--workdir {run_dir}: a {model_cfg.get('task')!r} model; the figure needs a "
                             "pre-training model (its MLM head)")
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except (TokenizerLoadError, OSError) as e:
        raise VisualizeError(f"--tokenizer {tokenizer_dir}: {e}") from None
    if not tokenizer.has_decoder:
        raise VisualizeError(f"--tokenizer {tokenizer_dir}: has no decoder, so tokens cannot be drawn")
    from vimpac_jax.training import workdir as workdir_lib

    run_config = workdir_lib.read_config_dict(run_dir) if workdir_lib.is_workdir(run_dir) else {}
    expected = _train_store_tokenizer_hash(run_config)
    if expected is not None and expected != tokenizer.weights_sha256:
        raise VisualizeError(f"--tokenizer {tokenizer_dir}: not the tokenizer of {run_dir}'s training store "
                             f"(weights sha256 {tokenizer.weights_sha256[:12]}..., the store's {expected[:12]}...)")
    clip_fps = run_config.get("data", {}).get("clip_fps", 2.0)
    num_blocks = args.mask_blocks or run_config.get("pretrain", {}).get("mask_blocks", 5)
    t, h, w = model_cfg["clip_len"], model_cfg["height"], model_cfg["width"]
    if h != w:
        raise VisualizeError(f"the model's token grid is {h}x{w}; only square frames are drawn")
    size = h * tokenizer.downsample

    (center,) = [v for v in vd.variants_for("pretrain", size)]
    clips, skipped = [], []
    for path in paths:
        if len(clips) == args.num_videos:
            break
        try:
            frames = vd.decode_variants(path, clip_fps, [center], max_frames=t)[center.name]
        except vd.VideoDecodeError as e:
            skipped.append(f"{path}: {e}")
            continue
        if len(frames) < t:
            skipped.append(f"{path}: {len(frames)} frames at {clip_fps} fps, the model needs {t}")
            continue
        clips.append(frames[:t])
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not clips:
        raise VisualizeError(f"--videos {args.videos}: no usable video ({len(skipped)} skipped)")

    _, variables = load_exportable(run_dir)
    model = build_model(model_cfg)
    rec = visualize.reconstruct(model, variables, tokenizer, np.stack(clips), jax.random.key(args.seed), num_blocks)
    visualize.write_png(args.out, visualize.figure_image(rec, scale=args.scale))
    masked = rec.mask.mean()
    accuracy = (rec.predicted_tokens == rec.tokens)[rec.mask].mean() if rec.mask.any() else float("nan")
    print(f"wrote {args.out}: {len(clips)} clips x {t} frames at {size} px; rows per clip: "
          f"{', '.join(visualize.ROWS)}; masked {masked:.1%} of tokens ({num_blocks} blocks), "
          f"{accuracy:.1%} of them predicted exactly")
    return 0
