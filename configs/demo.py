"""The built-in default of `vimpac demo`: every stage of the chain on the generated dataset.

Variants: `stage=tokenizer|pretrain|finetune`, `preset=default|full`.
  default  32 px videos (4x4 tokens), a tiny VQ tokenizer and a 2-layer d=128 model: the whole
           chain runs in minutes on 2 CPU cores.
  full     64 px videos (8x8 tokens), 4 layers d=256, longer schedules: an accelerator, or a long
           CPU budget.
`vimpac demo` fills in the data paths; everything else is here.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import tokenizer as tokenizer_configs  # noqa: E402
from vimpac_jax.config_utils import parse_arg  # noqa: E402

PRESETS = {
    # frame size, clip frames, clip fps, model, steps (tokenizer / pretrain / finetune), batches
    "default": dict(size=32, clip_len=4, fps=4.0, layers=2, hidden=128, tok_steps=300, pre_steps=300,
                    ft_steps=150, pre_batch=32, ft_batch=32, mask_blocks=3),  # 3 blocks: 14.9% of 4x4x4
    "full": dict(size=64, clip_len=8, fps=4.0, layers=4, hidden=256, tok_steps=3000, pre_steps=4000,
                 ft_steps=1000, pre_batch=64, ft_batch=32, mask_blocks=4),
}


def get_config(arg: str | None = None):
    arg = parse_arg(arg, stage="pretrain", preset="default")
    if arg.preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {arg.preset!r}")
    p = PRESETS[arg.preset]
    if arg.stage == "tokenizer":
        config = tokenizer_configs.get_config("tiny")
        config.train.update(num_steps=p["tok_steps"], batch_size=32, log_every=50, checkpoint_every=1000)
        config.train.data.update(fps=p["fps"], size=p["size"], max_frames_per_video=16, num_workers=0)
        return config
    if arg.stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage must be tokenizer, pretrain or finetune, got {arg.stage!r}")
    config = common.base_config(arg.stage)
    config.model = common.model_config("tiny", task=arg.stage, clip_len=p["clip_len"], frame_size=p["size"],
                                       num_classes=8 if arg.stage == "finetune" else 0)
    config.model.update(num_layers=p["layers"], hidden_dim=p["hidden"], num_heads=p["hidden"] // 32,
                        proj_hidden_dim=2 * p["hidden"], vocab_size=8197)
    config.data.update(clip_fps=p["fps"], eval_clips=2, eval_batch_size=16, workers=0)
    config.train.update(log_every=25, checkpoint_every=10_000, keep_checkpoints=1, progress_seconds=15.0)
    if arg.stage == "pretrain":
        config.optim.update(learning_rate=1e-3, warmup=0.1, weight_decay=0.05, b2=0.98)
        config.data.batch_size = p["pre_batch"]
        config.train.num_steps = p["pre_steps"]
        config.pretrain.update(mask_blocks=p["mask_blocks"], micro_batches=1)
    else:
        config.optim.update(learning_rate=5e-4, warmup=0.1, weight_decay=0.01, b2=0.999)
        config.data.batch_size = p["ft_batch"]
        config.train.num_steps = p["ft_steps"]
        config.model.dropout = 0.1
        config.eval_crops = "three"
        config.class_names = [""] * 8  # `vimpac demo` fills in the dataset's names
    return config
