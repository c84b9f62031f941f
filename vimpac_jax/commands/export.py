"""`vimpac export --workdir DIR --format torch|safetensors|stablehlo --out PATH [--force]`.

DIR is a model checkpoint (`vimpac convert ...`) or a training workdir (its latest complete
step). PATH becomes a directory:
  torch        classifier.pt + args.pickle: the released PyTorch layout (no PyTorch needed)
  safetensors  model.safetensors + model_config.json
  stablehlo    model.stablehlo + signature.json: the inference function, weights included,
               symbolic batch size; served with jax.export.deserialize, no vimpac code
PATH is written under a temporary name and renamed when complete; it must lie outside DIR. The
classifier's class names (the run's, or a checkpoint's class_names.txt) go beside it in
class_names.txt, where `vimpac predict` finds them.
"""

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

from vimpac_jax import exit_codes
from vimpac_jax.export import FORMATS
from vimpac_jax.io_utils import atomic_directory
from vimpac_jax.export.source import (ExportSourceError, class_names, load_exportable, load_model_config, source_kind,
                                      write_class_names)
from vimpac_jax.export.torch_format import ExportError, released_incompatibilities

_WRITERS = {
    "torch": ("vimpac_jax.export.torch_format", "export_torch"),
    "safetensors": ("vimpac_jax.export.safetensors_format", "export_safetensors"),
    "stablehlo": ("vimpac_jax.export.stablehlo_format", "export_stablehlo"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vimpac export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="model checkpoint directory or training workdir")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--force", action="store_true",
                        help="torch: write a model the released code cannot build (e.g. layout TxHxW)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--platforms", default="cpu,cuda",
                        help="stablehlo: comma-separated platforms to lower for, of cpu, cuda, rocm, tpu "
                             "(default: cpu,cuda)")
    return parser


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for


def _platforms(text: str) -> list[str]:
    platforms = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ExportError(f"--platforms {text!r}: expected a comma-separated subset of {list(PLATFORMS)}")
    return platforms


def check_out_apart(source, out) -> None:
    """--out must neither be, hold nor lie inside the source (symlinks resolved): `--overwrite`
    removes OUT, which would delete the checkpoint or the training run being exported."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src or src.is_relative_to(dst) or dst.is_relative_to(src):
        where = "is" if dst == src else "holds" if src.is_relative_to(dst) else "lies inside"
        raise ExportError(f"--out {out} {where} the source --workdir {source} ({src}); "
                          f"write the export somewhere else")


def main(argv) -> int:
    args = _parser().parse_args(argv)
    try:
        check_out_apart(args.workdir, args.out)
        if Path(args.out).exists() and not args.overwrite:
            raise FileExistsError(f"--out {args.out} already exists; choose another or pass --overwrite")
        kind = source_kind(args.workdir)
        module_name, function_name = _WRITERS[args.format]
        writer = getattr(importlib.import_module(module_name), function_name)
        kwargs = {}
        if args.format == "torch":
            kwargs["force"] = args.force
            problems = released_incompatibilities(load_model_config(args.workdir))
            if problems and not args.force:  # refuse before restoring any weights
                raise ExportError("the released PyTorch code cannot build this model:\n  " + "\n  ".join(problems)
                                  + "\n(pass --force to write the files anyway)")
        if args.format == "stablehlo":
            kwargs["platforms"] = _platforms(args.platforms)
        start = time.time()
        config, variables = load_exportable(args.workdir)
        names = class_names(args.workdir)  # the run's (or the checkpoint's), carried on beside the export
        with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
            summary = writer(config, variables, tmp, **kwargs)
            if names:
                write_class_names(tmp, names)
                summary["class_names"] = len(names)
    except (ExportSourceError, ExportError, FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"vimpac export: error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except OSError as e:  # a read-only or full --out (nothing is left there: atomic_directory)
        from vimpac_jax.cli import WRITE_ERRORS, write_error_message

        if e.errno not in WRITE_ERRORS:
            raise
        print(f"vimpac export: error: {write_error_message(e, f'--out {args.out}')}", file=sys.stderr)
        return WRITE_ERRORS[e.errno]
    for warning in summary.get("warnings", []):
        logging.getLogger(__name__).warning(f"vimpac export: warning: {warning}")
    details = ", ".join(f"{k}={v}" for k, v in summary.items() if k != "warnings")
    print(f"exported {args.workdir} ({kind}, task={config['task']}) -> {args.out} "
          f"[{args.format}] {details} in {time.time() - start:.1f}s")
    return 0
