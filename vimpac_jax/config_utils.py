"""Loading ml_collections config files from the command line, big_vision style.

`--config configs/pretrain.py:small,runlocal --config.model.dropout=0.0` is parsed by
ml_collections' own config flag on a private FlagValues, so that each command keeps argparse
for its other options and configs are locked (a misspelt field is an error before anything
compiles).
"""

from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'small,runlocal,dataset=ucf101' -> ConfigDict(small=True, runlocal=True, dataset='ucf101').

    Flags not named in the string keep `defaults`; a bare word sets a boolean True.
    """
    cfg = ml_collections.ConfigDict(dict(defaults))
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            key, value = part.split("=", 1)
            default = defaults.get(key)
            if isinstance(default, bool):
                value = value.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
            cfg[key] = value
        else:
            cfg[part] = True
    return cfg


def load_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """Parse `--config FILE[:ARG]` and `--config.a.b=VALUE` overrides out of `argv`.

    Every element of argv must be one of those; raises ValueError with the flag's name otherwise.
    """
    fv = flags.FlagValues()
    argv = ["vimpac", *argv]
    # sys_argv: ml_collections registers the --config.FIELD override flags it finds there
    # (default: the process's sys.argv, which is not what a caller passes in).
    config_flags.DEFINE_config_file("config", None, "config file, FILE.py[:ARG]", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    try:
        fv(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        message = str(e).replace("\\n", " ").replace("\\", "").replace("'", "").strip()
        raise ValueError(f"bad --config flag: {message}") from e
    if fv.config is None:
        raise ValueError("--config FILE.py[:ARG] is required")
    return fv.config


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `--config...` arguments (and their values) from the rest of argv."""
    config_args, rest = [], []
    it = iter(argv)
    for a in it:
        if a == "--config" or (a.startswith("--config.") and "=" not in a):
            config_args += [a, next(it, "")]
        elif a.startswith("--config=") or a.startswith("--config."):
            config_args.append(a)
        else:
            rest.append(a)
    return config_args, rest
