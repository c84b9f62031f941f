"""`vimpac convert official SRC DST` and `vimpac convert dalle --encoder E [--decoder D] DST`."""

import importlib
import sys

_TARGETS = {
    "official": "vimpac_jax.conversion.official",  # released VIMPAC checkpoints
    "dalle": "vimpac_jax.conversion.dalle",  # published DALL-E dVAE pickles
}


def main(argv) -> int:
    if not argv or argv[0] not in _TARGETS:
        print("usage: vimpac convert {official,dalle} ...\n"
              "  official SRC DST                              a released checkpoint directory\n"
              "  dalle --encoder E.pkl [--decoder D.pkl] DST   the DALL-E dVAE",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(_TARGETS[argv[0]]).main(argv[1:]) or 0)
