"""`vimpac demo [--workdir DIR] [--preset default|full|smoke] [--seed S] [--ablation --seeds 0,1,2]`.

The built-in default, end to end: generates a video dataset, trains a VQ tokenizer, tokenizes,
pre-trains VIMPAC, draws the masked-token reconstruction figure (Fig. 5), fine-tunes from the
pre-trained weights and from scratch, runs the multi-view test of both and prints a table,
then classifies two validation video files with `vimpac predict` (top-3 beside the true class).
Presets: `default` takes minutes on 2 CPU cores; `full` is larger (an accelerator, or a longer
CPU budget); `smoke` checks the chain in seconds (its numbers mean nothing).

--ablation runs the paper's Table 7 instead: per seed, fine-tuning from scratch and from
pre-training with the mask loss only, the contrastive loss only, and both; it prints mean ±
std over the seeds and writes ablation.json and ablation.md to the workdir.
"""

import argparse
import json
from pathlib import Path


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must differ, got {text!r}")
    return seeds


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="vimpac demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="demo_workdir")
    parser.add_argument("--preset", default="default", choices=["default", "full", "smoke"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every run")
    parser.add_argument("--ablation", action="store_true", help="the four-variant table over --seeds")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="training seeds of --ablation")
    args = parser.parse_args(argv)
    from vimpac_jax.demo.chain import format_ablation, format_table, run_ablation, run_demo

    workdir = Path(args.workdir)
    if args.ablation:
        summary = run_ablation(workdir, preset=args.preset, seeds=args.seeds, data_seed=args.seed)
        table = format_ablation(summary)
        (workdir / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
        (workdir / "ablation.md").write_text(table + "\n")
        print(table)
        print(f"\nfinished in {summary['seconds']:.0f} s; runs under {workdir / 'ablation'}")
        return 0
    summary = run_demo(workdir, preset=args.preset, seed=args.seed)
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(format_table(summary))
    return 0
