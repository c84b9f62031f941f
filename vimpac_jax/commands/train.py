"""`vimpac train --config CONFIG --workdir DIR [--config.FIELD=VALUE ...]`.

One program for every task (the config's `task`: pretrain, finetune, tokenizer). Configs are
ml_collections files with variants, e.g. `configs/pretrain.py:small`,
`configs/finetune.py:dataset=ucf101,model=small`, `configs/tokenizer.py:tiny`; add `runlocal`
to shrink any of them to seconds on one CPU. Started again in the same workdir, it resumes.

Exit codes: 0 done; 75 preempted (SIGTERM or SIGINT: the checkpoint of the current step is
saved; run the same command again to resume); 1 failed during the run (e.g. metrics or a
checkpoint could not be written); 2 bad config, data or workdir; 3 a non-finite loss.
"""

import argparse
import json
import sys

from vimpac_jax import exit_codes
from vimpac_jax.config_utils import load_config, split_config_args


def _stop_with_sweep() -> None:
    """Started by `vimpac sweep` (sweeps.PARENT_PID_ENV): stop as on SIGTERM (save, exit 75)
    once the sweep is gone, so a sweep killed with SIGKILL leaves no run going on alone."""
    import os
    import signal

    from vimpac_jax import io_utils
    from vimpac_jax.sweeps import PARENT_PID_ENV

    parent = os.environ.get(PARENT_PID_ENV, "")
    if parent.isdigit():
        io_utils.watch_parent(int(parent), lambda: os.kill(os.getpid(), signal.SIGTERM))


def main(argv) -> int:
    config_args, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(prog="vimpac train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="FILE.py[:ARG], plus --config.FIELD=VALUE overrides")
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, config.json)")
    args = parser.parse_args(rest + (["--config", "x"] if config_args else []))
    from pathlib import Path

    if Path(args.workdir).exists() and not Path(args.workdir).is_dir():
        print(f"vimpac train: error: --workdir {args.workdir} is a file; expected a run directory (made if absent)",
              file=sys.stderr)
        return exit_codes.BAD_INPUT
    try:
        config = load_config(config_args)
    except ValueError as e:
        print(f"vimpac train: error: {e}", file=sys.stderr)
        return 2
    from vimpac_jax.runtime.distributed import maybe_initialize

    maybe_initialize()
    _stop_with_sweep()
    from vimpac_jax.data.pipelines import DataWorkerError
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training import train as train_lib
    from vimpac_jax.training.checkpointing import CheckpointSaveError
    from vimpac_jax.training.metrics import MetricWriteError

    try:
        result = train_lib.train(config, args.workdir, make_task)
    except (ValueError, FileNotFoundError) as e:
        print(f"vimpac train: error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except train_lib.NonFiniteLossError as e:
        print(f"vimpac train: {e}", file=sys.stderr)
        return exit_codes.NON_FINITE
    except (MetricWriteError, CheckpointSaveError, DataWorkerError, train_lib.RunInterruptedError) as e:
        print(f"vimpac train: error: {e}", file=sys.stderr)
        return exit_codes.FAILED
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, bool))}))
    return train_lib.exit_code(result)
