"""`vimpac evaluate --workdir DIR [--clips K[,K...]] [--crops C]`: the multi-view test of a fine-tuned run.

Softmax scores are averaged per video over K clips x C crops (default: the config's, 10 x 3;
SSV2 uses the center crop only). Writes eval_results.json (top-1, top-5, the eval loss,
per-class accuracy), predictions.csv and confusion_matrix.png (also in the run's TensorBoard
log; needs the viz extra, or --no-pictures) to the workdir, and prints a table. Progress (videos
done, videos/s, views/s, ETA) goes to stderr. Several K in one
call (`--clips 2,5,10`, the released `--last-test-clips`) test each in turn: the files hold the
last K's results, and eval_results.json also `by_clips` {K: top1, top5, loss, mean class accuracy}.
eval_results.json names the store it tested (`eval_store`). With --eval-store another than the
run's own, the files go to `DIR/eval-<store name>/` instead (beside the run's own results, never
over them; a second store of that name gets its path's hash added).
"""

import argparse
import sys
from pathlib import Path
from typing import Optional

CONFUSION_MATRIX_FILE = "confusion_matrix.png"


def restore_params(workdir: Path, config, mesh):
    """(step, params) of the newest intact checkpoint, laid out on `mesh` like the training
    state's parameters (the optimizer state is not read)."""
    from vimpac_jax.training import workdir as workdir_lib
    from vimpac_jax.training.pretrain_step import param_shardings

    shardings = param_shardings(config.model.to_dict(), mesh)
    step, restored = workdir_lib.restore_variables(workdir, ("params",), shardings={"params": shardings})
    return step, restored["params"]


def format_table(results: list[dict]) -> str:
    """One column per tested K."""
    rows = [("top-1", "top1", ".2f"), ("top-5", "top5", ".2f"), ("loss", "loss", ".4f"),
            ("mean class accuracy", "mean_class_accuracy", ".2f"), ("videos", "num_videos", "d")]
    lines = ["| metric | " + " | ".join(f"{r['num_clips']} clips x {len(r['crops'])} crops" for r in results) + " |",
             "|---|" + "---|" * len(results)]
    lines += [f"| {label} | " + " | ".join(format(r[key], fmt) for r in results) + " |" for label, key, fmt in rows]
    return "\n".join(lines)


def parse_clips(value: str) -> list[int]:
    try:
        clips = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        clips = []
    if not clips or min(clips) < 1:
        raise ValueError(f"--clips must be positive integers separated by commas (e.g. 2,5,10), got {value!r}")
    return clips


def results_dir(workdir: Path, store: str, own_store: str) -> Path:
    """Where the results on `store` go: the workdir for the run's own held-out store, else
    `workdir/eval-<store's name>` (`-<hash of its path>` added if that one holds another store's)."""
    import hashlib
    import json

    store_path = Path(store).absolute()
    if own_store and store_path == Path(own_store).absolute():
        return workdir
    out = workdir / f"eval-{store_path.name}"
    try:
        recorded = json.loads((out / "eval_results.json").read_text()).get("eval_store")
    except (OSError, ValueError):
        recorded = None
    if recorded not in (None, str(store_path)):
        out = workdir / f"eval-{store_path.name}-{hashlib.sha256(str(store_path).encode()).hexdigest()[:8]}"
    return out


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="vimpac evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--clips", default=None,
                        help="K clips per crop, or several K to test in turn (2,5,10); default: config.data.eval_clips")
    parser.add_argument("--crops", default=None, help="3 (the three no-flip crops) or 1 / center")
    parser.add_argument("--eval-store", default=None, help="another held-out token store (default: the config's)")
    parser.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--no-pictures", action="store_true",
                        help=f"do not draw {CONFUSION_MATRIX_FILE} (drawing needs the viz extra: pip install "
                             "'vimpac-jax[viz]')")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    from vimpac_jax.training import workdir as workdir_lib

    try:
        # The flags first, then the run: nothing is read for a command line that cannot run.
        clips = [None] if args.clips is None else parse_clips(args.clips)
        if args.crops not in (None, "3", "1", "center", "three"):
            raise ValueError(f"--crops must be 3 or 1 (center), got {args.crops!r}")
        if not args.no_pictures:
            from vimpac_jax import plots

            try:
                plots.require("PIL.Image", CONFUSION_MATRIX_FILE)
                plots.require("matplotlib", CONFUSION_MATRIX_FILE)
            except plots.VizExtraMissing as e:
                raise ValueError(f"{e}; or pass --no-pictures") from None
        config = workdir_lib.read_config(workdir_lib.require_workdir(workdir))
        if config.task != "finetune":
            raise ValueError(f"{workdir}: evaluate needs a fine-tuning run, this one is task={config.task!r}")
        store = args.eval_store or config.data.eval_store
        if not store:
            raise ValueError("no held-out split: the run's config.data.eval_store is empty; pass --eval-store")
        from vimpac_jax.runtime.distributed import maybe_initialize

        maybe_initialize()
        from vimpac_jax.data import pipelines
        from vimpac_jax.training import sharding as shd
        from vimpac_jax.tasks.multiview import evaluate_classifier
        from vimpac_jax.tasks.store_task import check_store_fits
        from vimpac_jax.training.train import write_eval_results

        index = pipelines.load_index(store)
        check_store_fits(index, config.model, "data.eval_store", clip_fps=config.data.clip_fps)
        mesh = shd.make_mesh(config.mesh)
        step, params = restore_params(workdir, config, mesh)
    except (ValueError, FileNotFoundError) as e:
        print(f"vimpac evaluate: error: {e}", file=sys.stderr)
        return 2
    import jax

    from vimpac_jax.progress import Progress
    from vimpac_jax.tasks.multiview import multiview_protocol

    crops = {"3": "three", None: None}.get(args.crops, args.crops)
    from vimpac_jax.training.finetune_step import make_eval_step

    eval_step = make_eval_step(config.model.to_dict(), mesh)  # one jit for every K (a shape each)
    results = []
    for k in clips:
        k, variants = multiview_protocol(config, index, k, crops)
        views = len(variants)
        progress = Progress(index.num_videos, label=f"evaluate {k} clips x {views} crops: ", unit="videos",
                            per_unit={"views": k * views}, every_seconds=args.progress_interval,
                            enabled=jax.process_index() == 0)
        results.append(evaluate_classifier(config, mesh, index, params, num_clips=k, crops=crops,
                                           progress=progress, eval_step=eval_step))
        progress.close()
    result = dict(results[-1], step=step, eval_store=str(Path(store).absolute()))
    if len(results) > 1:
        result["by_clips"] = {str(r["num_clips"]): {key: r[key] for key in ("top1", "top5", "loss", "mean_class_accuracy")}
                              for r in results}
    if jax.process_index() == 0:
        out = results_dir(workdir, store, config.data.eval_store)
        out.mkdir(exist_ok=True)
        write_eval_results(out, result)
        print(format_table(results))
        written = [out / "eval_results.json", out / "predictions.csv"]
        if not args.no_pictures:
            tag = "eval" if out == workdir else f"eval/{out.name}"
            written.append(write_confusion_matrix(workdir, result, config, step, out=out, tag=tag))
        print(f"wrote {', '.join(map(str, written))}")
    return 0


def write_confusion_matrix(workdir: Path, result: dict, config, step: int, out: Optional[Path] = None, tag: str = "eval"
                           ) -> Path:
    """out (default workdir)/confusion_matrix.png of the last tested K (rows: true class,
    normalised), also in the run's TensorBoard log (tag `<tag>/confusion_matrix` at the
    checkpoint's step)."""
    from vimpac_jax import plots

    predictions = result["predictions"]
    matrix = plots.confusion_matrix([p["label"] for p in predictions], [p["prediction"] for p in predictions],
                                    int(config.model.num_classes))
    title = (f"step {step}: top-1 {result['top1']:.2f}%, {result['num_clips']} clips x "
             f"{len(result['crops'])} crops, {result['num_videos']} videos")
    from vimpac_jax.tasks.multiview import class_names_of

    image = plots.confusion_matrix_image(matrix, class_names_of(config), title=title)
    path = plots.write_png((out or workdir) / CONFUSION_MATRIX_FILE, image)
    plots.write_tensorboard_images(workdir / "tensorboard", step, {f"{tag}/confusion_matrix": image})
    return path
