"""`vimpac evaluate --workdir DIR [--clips K] [--crops C]`: the multi-view test of a fine-tuned run.

Softmax scores are averaged per video over K clips x C crops (default: the config's, 10 x 3;
SSV2 uses the center crop only). Writes eval_results.json (top-1, top-5, per-class accuracy)
and predictions.csv to the workdir, and prints a table.
"""

import argparse
import json
import sys
from pathlib import Path

import ml_collections


def load_workdir_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir (no config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_params(workdir: Path, config, mesh):
    """The latest checkpoint's parameters, laid out on `mesh` like the training state."""
    import jax

    import orbax.checkpoint as ocp

    from vimpac_jax.training.pretrain_step import abstract_train_state, train_state_shardings

    model_cfg = config.model.to_dict()
    optim_cfg = dict(config.optim.to_dict(), total_steps=max(int(config.optim.total_steps), 1))
    shardings = train_state_shardings(model_cfg, optim_cfg, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_train_state(model_cfg, optim_cfg), shardings)
    manager = ocp.CheckpointManager(workdir.absolute() / "checkpoints")
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no complete checkpoint")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return step, state


def format_table(result: dict) -> str:
    lines = [f"| metric | value |", "|---|---|", f"| top-1 | {result['top1']:.2f} |", f"| top-5 | {result['top5']:.2f} |",
             f"| mean class accuracy | {result['mean_class_accuracy']:.2f} |", f"| videos | {result['num_videos']} |",
             f"| views per video | {result['num_clips']} clips x {len(result['crops'])} crops |"]
    return "\n".join(lines)


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="vimpac evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--clips", type=int, default=None, help="K clips per crop (default: config.data.eval_clips)")
    parser.add_argument("--crops", default=None, help="3 (the three no-flip crops) or 1 / center")
    parser.add_argument("--eval-store", default=None, help="another held-out token store (default: the config's)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    try:
        config = load_workdir_config(workdir)
        if config.task != "finetune":
            raise ValueError(f"{workdir}: evaluate needs a fine-tuning run, this one is task={config.task!r}")
        store = args.eval_store or config.data.eval_store
        if not store:
            raise ValueError("no held-out split: the run's config.data.eval_store is empty; pass --eval-store")
        if args.crops not in (None, "3", "1", "center", "three"):
            raise ValueError(f"--crops must be 3 or 1 (center), got {args.crops!r}")
        from vimpac_jax.launch.distributed import maybe_initialize

        maybe_initialize()
        from vimpac_jax.data import pipelines
        from vimpac_jax.training import sharding as shd
        from vimpac_jax.training.tasks import check_store_fits, evaluate_classifier
        from vimpac_jax.training.train import write_eval_results

        index = pipelines.load_index(store)
        check_store_fits(index, config.model, "eval_store")
        mesh = shd.make_mesh(config.mesh)
        step, state = restore_params(workdir, config, mesh)
    except (ValueError, FileNotFoundError) as e:
        print(f"vimpac evaluate: error: {e}", file=sys.stderr)
        return 2
    crops = {"3": "three", None: None}.get(args.crops, args.crops)
    result = evaluate_classifier(config, mesh, index, state.params, num_clips=args.clips, crops=crops)
    result["step"] = step
    import jax

    if jax.process_index() == 0:
        write_eval_results(workdir, result)
        print(format_table(result))
        print(f"wrote {workdir / 'eval_results.json'} and {workdir / 'predictions.csv'}")
    return 0
