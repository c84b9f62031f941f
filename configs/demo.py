"""The built-in default of `vimpac demo`: every stage of the chain on the generated dataset.

Variants: `stage=tokenizer|pretrain|finetune`, `preset=default|full|smoke`.
  default  48 px videos (6x6 tokens), a tiny VQ tokenizer and a 2-layer d=128 model: the whole
           chain runs in minutes on 2 CPU cores.
  full     64 px videos (8x8 tokens), 4 layers d=256, longer schedules: an accelerator, or a long
           CPU budget.
  smoke    16 px, 3 steps per stage: the test suite's run of the whole chain.
`vimpac demo` fills in the data paths; everything else is here.
"""

from vimpac_jax.config_utils import parse_arg
from vimpac_jax.configs import common
from vimpac_jax.configs import tokenizer as tokenizer_configs

PRESETS = {
    # frame size, clip frames, clip fps, model, steps (tokenizer / pretrain / finetune), batches
    "default": dict(size=48, clip_len=4, fps=2.0, layers=2, hidden=128, tok_steps=120, tok_batch=32, pre_steps=300,
                    ft_steps=300, pre_batch=16, ft_batch=16, ft_lr=1e-3, mask_blocks=4,  # 4 blocks: 15.5% of 4x6x6
                    codes=128, dropout=0.0),
    "full": dict(size=64, clip_len=8, fps=4.0, layers=4, hidden=256, tok_steps=3000, tok_batch=32, pre_steps=4000,
                 ft_steps=1000, pre_batch=64, ft_batch=32, ft_lr=5e-4, mask_blocks=4, codes=256, dropout=0.1),
    # The test suite's run of the whole chain: 16 px (2x2 tokens), a 1-layer d=64 model, 3 steps.
    "smoke": dict(size=16, clip_len=2, fps=4.0, layers=1, hidden=64, tok_steps=3, tok_batch=4, pre_steps=3,
                  ft_steps=3, pre_batch=4, ft_batch=4, ft_lr=1e-3, mask_blocks=1, codes=16, dropout=0.0),
}


def get_config(arg: str | None = None):
    arg = parse_arg(arg, stage="pretrain", preset="default")
    if arg.preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {arg.preset!r}")
    p = PRESETS[arg.preset]
    if arg.stage == "tokenizer":
        config = tokenizer_configs.get_config("tiny")
        config.model.codebook_size = p["codes"]
        config.train.update(num_steps=p["tok_steps"], log_every=50, checkpoint_every=1000)
        config.optim.warmup = min(20, p["tok_steps"] // 5)
        config.data.update(batch_size=p["tok_batch"], fps=p["fps"], size=p["size"], max_frames_per_video=16,
                           workers=0)
        return config
    if arg.stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage must be tokenizer, pretrain or finetune, got {arg.stage!r}")
    config = common.base_config(arg.stage)
    config.model = common.model_config("tiny", task=arg.stage, clip_len=p["clip_len"], frame_size=p["size"],
                                       num_classes=8 if arg.stage == "finetune" else 0)
    config.model.update(num_layers=p["layers"], hidden_dim=p["hidden"], num_heads=p["hidden"] // 32,
                        proj_hidden_dim=2 * p["hidden"], vocab_size=8197,
                        # No dropout at the CPU scale: its random bits cost as much as the layers.
                        dropout=p["dropout"], attention_dropout=p["dropout"])
    if arg.stage == "pretrain":
        config.model.mlm_codes = p["codes"]  # the tokenizer's codes: most MLM-head FLOPs otherwise
    config.data.update(clip_fps=p["fps"], eval_clips=2, eval_batch_size=16, workers=0)
    config.train.update(log_every=25, checkpoint_every=10_000, keep_checkpoints=1, progress_seconds=15.0)
    if arg.stage == "pretrain":
        config.optim.update(learning_rate=1e-3, warmup=0.1, weight_decay=0.05, b2=0.98)
        config.data.batch_size = p["pre_batch"]
        config.train.num_steps = p["pre_steps"]
        config.pretrain.update(mask_blocks=p["mask_blocks"], micro_batches=1)
        # The demo's stores are all at its clip rate: validation and kNN clips (if given) as training's.
        config.pretrain.eval_clip_fps = config.knn.clip_fps = p["fps"]
    else:
        config.optim.update(learning_rate=p["ft_lr"], warmup=0.1, weight_decay=0.01, b2=0.999)
        config.data.batch_size = p["ft_batch"]
        config.train.num_steps = p["ft_steps"]
        config.eval_crops = "three"
        config.class_names = [""] * 8  # `vimpac demo` fills in the dataset's names
    return config
