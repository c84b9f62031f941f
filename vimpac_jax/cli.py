"""The single `vimpac` entry point: `vimpac <command> [args]`.

Each command lives in its own module with a `main(argv) -> int`; it is imported only when
run, so that one command's dependencies (PyAV, TFDS, ...) never slow down or break another.

Rejected input is one line, not a traceback: a command's checks raise ValueError naming the
file, field or flag and what was expected (the project's convention: `InUseError`,
`CheckpointRestoreError`, ... are ValueErrors too), and a path given on the command line may
raise an `INPUT_ERRORS` OSError. Whatever of these a command does not handle itself is printed
here as `vimpac CMD: error: MESSAGE` with exit code `exit_codes.BAD_INPUT` (2); so is a
read-only file system under an output (`--out`, `--workdir`). A full disk (or quota) met while
writing is `exit_codes.FAILED` (1), the code of a run that failed: the same command resumes or
redoes the work once there is room. Set VIMPAC_TRACEBACK=1 to get the traceback instead. Flags that must be positive use
`positive_int` (argparse's own error, also exit code 2).
"""

import argparse
import errno
import importlib
import os
import sys

from vimpac_jax import exit_codes

# Errors of input that a command rejected (see the module docstring).
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)
# OSErrors of the place a command writes to, by errno: the exit code each is reported with.
WRITE_ERRORS = {errno.EROFS: exit_codes.BAD_INPUT, errno.ENOSPC: exit_codes.FAILED, errno.EDQUOT: exit_codes.FAILED}


def os_error_line(e: OSError) -> str:
    """'PATH: reason' of an OSError (not Python's "[Errno N] reason: 'PATH'")."""
    if e.filename is None:
        return e.strerror or str(e)
    return f"{e.filename}: {e.strerror or e}" + (f" (-> {e.filename2})" if e.filename2 else "")

COMMANDS = {
    "demo": ("vimpac_jax.commands.demo", "the built-in default end to end: videos -> tokens -> pre-train -> fine-tune -> test"),
    "params": ("vimpac_jax.commands.params", "print parameter counts of a model config"),
    "convert": ("vimpac_jax.commands.convert", "import released VIMPAC checkpoints or DALL-E weights"),
    "features": ("vimpac_jax.commands.features", "run a checkpoint on token clips and save its outputs"),
    "mask-ratio": ("vimpac_jax.commands.mask_ratio", "induced masking ratio of block masking"),
    "train": ("vimpac_jax.commands.train", "train a tokenizer, pre-train or fine-tune (config picks the task)"),
    "migrate": ("vimpac_jax.commands.migrate", "rewrite a run of an older vimpac-jax in the current run format"),
    "evaluate": ("vimpac_jax.commands.evaluate", "multi-view test of a fine-tuned workdir"),
    "predict": ("vimpac_jax.commands.predict", "classify video files with a fine-tuned model (top classes per video)"),
    "codes": ("vimpac_jax.commands.codes", "encode images to codes / decode codes to images with a tokenizer directory"),
    "tokenize": ("vimpac_jax.commands.tokenize", "turn a video collection into a token store"),
    "convert-store": ("vimpac_jax.commands.convert_store", "rewrite an old-layout token store in the chunked layout"),
    "export-tfds": ("vimpac_jax.commands.export_tfds", "write token stores as a TFDS dataset (ArrayRecord)"),
    "export": ("vimpac_jax.commands.export", "export a model: released PyTorch layout, safetensors, StableHLO"),
    "sweep": ("vimpac_jax.commands.sweep", "expand a config sweep into runs, launch them, summarise their metrics"),
    "visualize": ("vimpac_jax.commands.visualize", "draw the paper's Fig. 5: masked tokens and the model's reconstruction"),
    "compile": ("vimpac_jax.commands.compile", "compile a run's programs for a TPU slice (on a CPU host) or the local GPUs: memory per chip, the cost model's step time"),
    "demo-data": ("vimpac_jax.commands.demo_data", "generate the built-in motion video dataset (mp4 + lists)"),
}


def _usage() -> str:
    lines = ["usage: vimpac <command> [options]", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {help_text}")
    lines.append("")
    lines.append("Run `vimpac <command> --help` for the options of one command.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vimpac: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    from vimpac_jax import logs

    try:
        with logs.command_output():
            return int(module.main(rest) or 0)
    except INPUT_ERRORS as e:
        if os.environ.get("VIMPAC_TRACEBACK"):
            raise
        print(f"vimpac {name}: error: {os_error_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except OSError as e:
        if os.environ.get("VIMPAC_TRACEBACK") or e.errno not in WRITE_ERRORS:
            raise
        print(f"vimpac {name}: error: {write_error_message(e)}", file=sys.stderr)
        return WRITE_ERRORS[e.errno]


def write_error_message(e: OSError, output: str = "") -> str:
    """'cannot write [OUTPUT][ (PATH)]: reason' of a `WRITE_ERRORS` OSError; output: the flag and
    path the command writes to ("--out DIR"), when the command knows it."""
    path = "" if e.filename is None else str(e.filename)
    where = f" {output} ({path})" if output and path else f" {output or path}" if output or path else ""
    return f"cannot write{where}: {e.strerror or e}"


def positive_int(text: str) -> int:
    """argparse type of a count that must be >= 1 (`--batch-size`, ...)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def check_output_file(path, flag: str = "--out") -> None:
    """A file a command writes when its work is done: refused before the work if it cannot be
    written there (its directory is missing, or the path is a directory)."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; expected a file name")
    if not p.absolute().parent.is_dir():
        raise ValueError(f"{flag} {path}: the directory {p.absolute().parent} does not exist")
