"""VIMPAC pre-training (paper Tables 3 and 4; the released scripts/pretrain/*.sh).

Variants (comma-separated, big_vision style):
  model=small|base|large_half|tiny   (or just `small`): the paper's models, T=5, 128 px; alone,
                                       stage 1 of the final recipe: epochs [0, 90) of a 100-epoch
                                       schedule (scripts/pretrain/large.sh), to be followed by stage2
  stage2                             : the second stage, 256 px: epochs [90, 100) of the same
                                       100-epoch schedule, from stage 1's optimizer state, 6 blocks
                                       (scripts/pretrain/large_frame256cont.sh)
  analysis                           : the analysis recipe (10 epochs, lr 1e-3, 10% warm-up; one
                                       10-epoch schedule): scripts/pretrain/small.sh, and every
                                       analysis of the paper's Appendix F
  runlocal                           : tiny everything, runs on one CPU in seconds
Example: vimpac train --config configs/pretrain.py:small,analysis --workdir W --config.data.train_store=S
"""

from vimpac_jax.config_utils import parse_arg
from vimpac_jax.configs import common

PRESETS = ("tiny", "small", "base", "large_half")


def get_config(arg: str | None = None):
    arg = parse_arg(arg, model="small", stage2=False, analysis=False, runlocal=False,
                    **{p: False for p in PRESETS})
    preset = next((p for p in PRESETS if arg.get(p)), arg.model)
    config = common.base_config("pretrain")
    frame_size = 256 if arg.stage2 else 128
    config.model = common.model_config(preset, task="pretrain", clip_len=5, frame_size=frame_size)

    # Table 4, "Pre-train (final)": 100 epochs (90 at 128 px + 10 at 256 px), lr 3e-4, 5% warm-up,
    # linear decay, batch 1024 videos, AdamW (0.9, 0.98, 1e-8), wd 0.05, clip 1.0, dropout 0.1.
    # ONE 100-epoch schedule over both stages (scripts/pretrain/large.sh: --epochs 100 --interval
    # 90; large_frame256cont.sh: --epochs 100 --interval 10 --resume): stage 1 runs its first 90
    # epochs, stage 2 the last 10, from 0.1 x peak down to 0, with no second warm-up.
    config.optim.update(learning_rate=3e-4, schedule="linear", warmup=0.05, b1=0.9, b2=0.98, eps=1e-8,
                        weight_decay=0.05, clip_grad_norm=1.0, schedule_epochs=100.0)
    config.data.batch_size = 1024
    config.train.epochs = 90.0
    # Negatives come from one micro-batch (vimpac_jax/training/pretrain_step.py): 128-video
    # micro-batches (255 negatives per clip) in stage 1, 64-video ones (127 negatives) in stage 2
    # and in every analysis run (paper Appendix C.1 and Table 11's default row).
    config.pretrain.update(mlm_weight=1.0, nce_weight=1.0, mask_blocks=5, micro_batches=8)
    # Validation (data.eval_store) and the kNN monitor (knn.*_store), when given, every epoch: the
    # released scripts' --eval-per-epochs 1 (train.eval_every, in steps, overrides it).
    config.train.eval_every_epochs = 1.0
    if arg.stage2:
        config.train.epochs = 10.0         # epochs [90, 100) of the 100-epoch schedule above
        config.pretrain.micro_batches = 16  # 64-video micro-batches
        config.pretrain.mask_blocks = 6  # Table 2: 6 blocks at 32x32 tokens is nearest 15%
        # large_frame256cont.sh validates int(bs_per_gpu * 1.5) = int(1 * 1.5) = 1 video per GPU of
        # its 64 (batch 1024 in 16-step accumulations of 64): 64 videos, not 1.5 x 64.
        config.pretrain.eval_batch_size = 64
        config.init_from = ""  # set to the 128-px run's workdir: positional tables are interpolated,
        config.init_from_optimizer = True  # the Adam moments with them, and the schedule continues
    if arg.analysis:
        config.optim.update(learning_rate=1e-3, warmup=0.1, schedule_epochs=None)  # one 10-epoch run
        config.train.epochs = 10.0
        config.pretrain.micro_batches = 16  # 64-video micro-batches
    if arg.runlocal:
        common.runlocal(config)
        config.pretrain.micro_batches = 1
        if config.optim.schedule_epochs is not None:
            # The two-stage recipe at toy size: one 100-update schedule; each stage runs 10 of it.
            config.optim.update(schedule_epochs=None, schedule_steps=100)
    return config
