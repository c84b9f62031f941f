"""`vimpac export-tfds --store [SPLIT=]STORE [--store SPLIT=STORE ...] --name NAME --data-dir D`:
finished token stores -> one TFDS dataset in the ArrayRecord file format.

Each --store becomes a split (a bare STORE is 'train'). Read the result with
`tfds.data_source(NAME, data_dir=D, split=SPLIT)` (no TensorFlow needed) and feed it to grain.
Needs `pip install 'vimpac-jax[tfds]'`. See vimpac_jax/data/tfds_export.py for the features.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from vimpac_jax.data.tfds_export import DEFAULT_VERSION

    p = argparse.ArgumentParser(prog="vimpac export-tfds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", action="append", required=True, metavar="[SPLIT=]STORE",
                   help="a complete token store (vimpac tokenize --out), as split SPLIT (default train); repeatable")
    p.add_argument("--name", required=True, help="TFDS dataset name (snake_case, not one of TFDS's own)")
    p.add_argument("--data-dir", required=True, help="TFDS data_dir to write DATA_DIR/NAME/VERSION into")
    p.add_argument("--version", default=DEFAULT_VERSION, help=f"dataset version (default {DEFAULT_VERSION})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DATA_DIR/NAME/VERSION")
    return p


def main(argv) -> int:
    args = _parser().parse_args(argv)
    from vimpac_jax.data.tfds_export import export_stores, parse_store_args

    try:
        path = export_stores(parse_store_args(args.store), args.name, args.data_dir, version=args.version,
                             overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"vimpac export-tfds: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
