"""`vimpac train --config CONFIG --workdir DIR [--config.FIELD=VALUE ...]`.

One program for every task (the config's `task`: pretrain, finetune, tokenizer). Configs are
ml_collections files with variants, e.g. `configs/pretrain.py:small`,
`configs/finetune.py:dataset=ucf101,model=small`, `configs/tokenizer.py:tiny`; add `runlocal`
to shrink any of them to seconds on one CPU. Started again in the same workdir, it resumes.
"""

import argparse
import json
import sys

from vimpac_jax.config_utils import load_config, split_config_args


def main(argv) -> int:
    config_args, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(prog="vimpac train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="FILE.py[:ARG], plus --config.FIELD=VALUE overrides")
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, config.json)")
    args = parser.parse_args(rest + (["--config", "x"] if config_args else []))
    try:
        config = load_config(config_args)
    except ValueError as e:
        print(f"vimpac train: error: {e}", file=sys.stderr)
        return 2
    from vimpac_jax.launch.distributed import maybe_initialize

    maybe_initialize()
    from vimpac_jax.training.train import NonFiniteLossError, train

    try:
        result = train(config, args.workdir)
    except (ValueError, FileNotFoundError) as e:
        print(f"vimpac train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"vimpac train: {e}", file=sys.stderr)
        return 3
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, bool))}))
    return 0
