"""Loading ml_collections config files from the command line, big_vision style.

`--config configs/pretrain.py:small,runlocal --config.model.dropout=0.0` is parsed by
ml_collections' own config flag on a private FlagValues, so that each command keeps argparse
for its other options and configs are locked (a misspelt field is an error before anything
compiles), then resolved once (`config_schema.resolve`: every block completed from its defaults,
every field checked against its type and range, fields no block has refused).

Config files are found relative to the working directory first and, failing that, among the
installed configs (`vimpac_jax.configs`, which is the repository's top-level `configs/`, see
setup.py): `--config configs/pretrain.py:small` works in a checkout and from anywhere else.
"""

import os
from importlib import resources
from pathlib import Path
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


NOT_INSTALLED = ("the package's configs (vimpac_jax.configs) are not importable: vimpac_jax is imported from a "
                 "checkout that is not installed; install it (`pip install -e .` in the checkout, see setup.py)")
PACKAGED_PREFIX = "configs/"  # how the README names the installed configs: configs/pretrain.py


def packaged_configs() -> list[str]:
    """'configs/common.py', 'configs/sweeps/masking.py', ...: the config and sweep files installed."""
    out, stack = [], [(installed_config(""), PACKAGED_PREFIX)]
    while stack:
        node, prefix = stack.pop()
        for child in node.iterdir():
            if child.is_dir() and not child.name.startswith("__"):
                stack.append((child, f"{prefix}{child.name}/"))
            elif child.name.endswith(".py") and not child.name.startswith("__"):
                out.append(prefix + child.name)
    return sorted(out)


def installed_config(name: str) -> Path:
    """The installed config file NAME ('demo.py', 'sweeps/masking.py') of `vimpac_jax.configs`."""
    try:
        root = resources.files("vimpac_jax.configs")
    except ModuleNotFoundError as e:
        raise ValueError(NOT_INSTALLED) from e
    return Path(str(root.joinpath(*name.split("/"))))  # setuptools installs packages unzipped


def resolve_config_path(path: str) -> str:
    """A config (or sweep) file's path: PATH itself when it is a file, else the installed copy.

    `configs/NAME.py` that is not a file under the working directory resolves to the package's
    `vimpac_jax.configs/NAME.py` (the same file in an editable install; the installed copy of a
    wheel). Any other PATH comes back as it is, for the caller to report if it is missing.
    """
    if not os.path.isfile(path) and path.startswith(PACKAGED_PREFIX):
        candidate = installed_config(path[len(PACKAGED_PREFIX):])
        if candidate.is_file():
            return str(candidate)
    return path


def resolve_config_spec(spec: str) -> str:
    """`FILE.py[:ARG]` with FILE resolved by `resolve_config_path`; ValueError if FILE is neither a
    file nor an installed config (naming both places)."""
    path, sep, arg = spec.partition(":")  # ml_collections splits at the first ':' too
    resolved = resolve_config_path(path)
    if not os.path.isfile(resolved):
        raise ValueError(f"config file {path} not found (relative to {Path.cwd()}); the installed configs are "
                         f"{', '.join(packaged_configs())}")
    return resolved + sep + arg


def _resolve_config_flag(argv: Sequence[str]) -> list[str]:
    """argv with the value of `--config FILE[:ARG]` / `--config=FILE[:ARG]` resolved."""
    out, it = [], iter(argv)
    for a in it:
        if a == "--config":
            value = next(it, None)
            out += [a] if value is None else [a, resolve_config_spec(value)]
        elif a.startswith("--config="):
            out.append("--config=" + resolve_config_spec(a.split("=", 1)[1]))
        else:
            out.append(a)
    return out


def load_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """Parse `--config FILE[:ARG]` and `--config.a.b=VALUE` overrides out of `argv`.

    Every element of argv must be one of those; raises ValueError with the flag's name otherwise.
    """
    fv = flags.FlagValues()
    argv = ["vimpac", *_resolve_config_flag(argv)]  # ValueError naming a config file that is not there
    try:
        # sys_argv: ml_collections registers the --config.FIELD override flags it finds there
        # (default: the process's sys.argv, which is not what a caller passes in).
        config_flags.DEFINE_config_file("config", None, "config file, FILE.py[:ARG]", flag_values=fv,
                                        lock_config=True, sys_argv=argv)
        fv(argv)
    except ModuleNotFoundError as e:
        if e.name == "vimpac_jax.configs":  # the package itself, not a module a config file names
            raise ValueError(NOT_INSTALLED) from e
        raise
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        message = str(e).replace("\\n", " ").replace("\\", "").replace("'", "").strip()
        raise ValueError(f"bad --config flag: {message}") from e
    if fv.config is None:
        raise ValueError("--config FILE.py[:ARG] is required")
    from vimpac_jax import config_schema  # imports the blocks' modules (jax): not at config_utils' import

    # Completed (fields a config file lacks, at their blocks' defaults) and checked (every field's
    # type and range, unknown fields): before anything runs.
    return config_schema.resolve(fv.config)


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
