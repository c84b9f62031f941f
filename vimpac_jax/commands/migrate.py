"""`vimpac migrate --workdir W`: rewrite a run written by an older vimpac-jax in the current run
format, in place, so that `vimpac train` resumes it (and evaluate, export, predict, visualize and
`config.init_from` read it); W may also be a model checkpoint (model_config.json) written before
it recorded its format. What each format change converts: vimpac_jax/training/migrate.py.
"""

from __future__ import annotations

import argparse
import sys

from vimpac_jax import exit_codes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vimpac migrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True,
                   help="the run directory of `vimpac train` (config.json, checkpoints/), or a model checkpoint "
                        "(model_config.json, variables/)")
    return p


def main(argv) -> int:
    args = _parser().parse_args(argv)
    from vimpac_jax.training import migrate

    try:
        migrate.migrate_workdir(args.workdir)
    except ValueError as e:  # not a run, a newer format, in use (io_utils.InUseError)
        print(f"vimpac migrate: error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    return 0
