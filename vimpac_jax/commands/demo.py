"""`vimpac demo [--workdir DIR] [--preset default|full] [--seed S]`: the built-in default, end to end.

Generates a video dataset, trains a VQ tokenizer, tokenizes, pre-trains VIMPAC, fine-tunes from
the pre-trained weights and from scratch, runs the multi-view test of both and prints a table.
The default preset takes minutes on 2 CPU cores; `full` wants an accelerator.
"""

import argparse
import json
import sys
from pathlib import Path


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="vimpac demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="demo_workdir")
    parser.add_argument("--preset", default="default", choices=["default", "full"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from vimpac_jax.demo import format_table, run_demo

    summary = run_demo(args.workdir, preset=args.preset, seed=args.seed)
    (Path(args.workdir) / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(format_table(summary))
    return 0
