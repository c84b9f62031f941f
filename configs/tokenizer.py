"""Training a VQ tokenizer of this project's own (`vimpac_jax.tokenizer.vq`) on video frames.

`vimpac train --config configs/tokenizer.py:PRESET[,runlocal] --workdir W
 --config.train.data.videos=LIST`

Presets:
  tiny        CPU seconds: 32 px frames, 64 codes, widths 16/32/64/64, one block per group.
  small       128 px, 1024 codes, widths 64/128/256/256.
  dalle_like  128 px, 8192 codes, the dVAE's widths 256·(1, 2, 4, 8), two blocks per group.
  runlocal    (add to any preset) a few steps on a small batch, to check a setup end to end.

`train.data.videos` is a text file of video paths (one a line), a directory (searched
recursively for video files) or a glob pattern; frames are sampled from them at `fps`,
shorter side resized to `size`, center-cropped (`vimpac_jax.tokenizer.vq_data`).
"""

import ml_collections

from vimpac_jax.config_utils import parse_arg
from vimpac_jax.training.sharding import mesh_config

PRESETS = {
    "tiny": dict(model=dict(codebook_size=64, embedding_dim=16, widths=(16, 32, 64, 64), n_blk_per_group=1),
                 train=dict(batch_size=16, num_steps=300, lr=3e-3, warmup_steps=20), size=32),
    "small": dict(model=dict(codebook_size=1024, embedding_dim=64, widths=(64, 128, 256, 256), n_blk_per_group=2),
                  train=dict(batch_size=64, num_steps=100_000, lr=3e-4, warmup_steps=2_000), size=128),
    "dalle_like": dict(model=dict(codebook_size=8192, embedding_dim=256, widths=(256, 512, 1024, 2048),
                                  n_blk_per_group=2),
                       train=dict(batch_size=128, num_steps=200_000, lr=3e-4, warmup_steps=5_000), size=128),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, preset="small", tiny=False, small=False, dalle_like=False, runlocal=False)
    preset = next((p for p in PRESETS if arg.get(p)), arg.preset)
    if preset not in PRESETS:
        raise ValueError(f"tokenizer preset must be one of {sorted(PRESETS)}, got {preset!r}")
    spec = PRESETS[preset]

    config = ml_collections.ConfigDict()
    config.task = "tokenizer"
    config.preset = preset
    config.seed = 0
    # Data parallel only: the tokenizer's parameters are replicated (see train.flatten_optimizer).
    config.mesh = mesh_config()

    # The model block: vimpac_jax.tokenizer.vq.MODEL_FIELDS, plus the kind and compute dtype.
    config.tokenizer = ml_collections.ConfigDict(dict(
        kind="vq", channels=3, dtype="float32", **spec["model"]))

    # Field names shared with the other tasks' `config.train` (configs/common.py:train_config)
    # are read by the training loop; the rest by vimpac_jax.tokenizer.vq_train.init_state.
    config.train = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.99, grad_clip=1.0,
        flatten_optimizer=True,  # Adam on one raveled vector: fast to compile; replicated params
        commitment_beta=0.25,   # van den Oord et al.'s beta
        ema_decay=0.99,         # codebook EMA decay
        epsilon=1e-5,           # Laplace smoothing of the EMA counts
        restart_threshold=1.0,  # restart codes used by < 1 vector per batch (EMA); <= 0 disables
        log_every=50, checkpoint_every=1_000, keep_checkpoints=3, eval_every=0, progress_seconds=10.0,
        **spec["train"],
    ))
    config.train.data = ml_collections.ConfigDict(dict(
        videos="",                # list file / directory / glob; required
        fps=2.0,                  # frames sampled per second of video
        size=spec["size"],        # square frame side (a multiple of 8)
        max_frames_per_video=64,  # cap per file, so long videos do not dominate the pool
        max_pool_gib=8.0,         # refuse to cache more decoded frames in memory than this
        num_workers=4,            # decoding processes (0: decode in this process)
        flip=True,                # random horizontal flips
    ))

    if arg.runlocal:
        config.train.update(batch_size=4, num_steps=20, warmup_steps=2, log_every=1, checkpoint_every=10)
        config.train.data.update(max_frames_per_video=8, num_workers=0)
    return config
