"""`vimpac params --config CONFIG`: parameter counts of the model a config describes."""

import argparse
import sys

import flax
import numpy as np

from vimpac_jax.config_utils import load_config, split_config_args
from vimpac_jax.models.model import abstract_variables, build_model


def count_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in flax.traverse_util.flatten_dict(tree).values())


def parameter_counts(model_config) -> dict[str, int]:
    """{'backbone': N, 'mlm_head': ..., 'proj_head': ... or 'classifier': ...} (params only)."""
    params = abstract_variables(build_model(model_config), model_config)["params"]
    return {name: count_params(sub) for name, sub in params.items()}


def main(argv) -> int:
    config_args, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(prog="vimpac params", description=__doc__)
    parser.add_argument("--config", help="config file FILE.py[:ARG] (plus --config.FIELD=VALUE overrides)")
    parser.parse_args(rest + (["--config", "x"] if config_args else []))
    try:
        config = load_config(config_args)
    except ValueError as e:
        print(f"vimpac params: error: {e}", file=sys.stderr)
        return 2
    counts = parameter_counts(config.model.to_dict())
    for name, n in counts.items():  # the backbone first: it is the number the paper reports
        print(f"{name}_params={n}")
    print(f"total_params={sum(counts.values())}")
    return 0
