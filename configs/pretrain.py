"""VIMPAC pre-training (paper Tables 3 and 4).

Variants: `configs/pretrain.py:small`, `:base`, `:large_half` (128 px, T=5), `:tiny` for CPU
checks; add `,layout=T,H,W`-style overrides with --config.model.FIELD=VALUE.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from vimpac_jax.config_utils import parse_arg  # noqa: E402


def get_config(arg: str | None = None):
    arg = parse_arg(arg, model="small", small=False, base=False, large_half=False, tiny=False)
    preset = next((p for p in ("tiny", "small", "base", "large_half") if arg.get(p)), arg.model)
    config = common.ml_collections.ConfigDict()
    config.model = common.model_config(preset, task="pretrain", clip_len=5, frame_size=128)
    return config
