"""Training a VQ tokenizer of this project's own (`vimpac_jax.tokenizer.vq`) on video frames.

`vimpac train --config configs/tokenizer.py:PRESET[,runlocal] --workdir W --config.data.videos=LIST`

Presets:
  tiny        CPU seconds: 32 px frames, 64 codes, widths 16/32/64/64, one block per group.
  small       128 px, 1024 codes, widths 64/128/256/256.
  dalle_like  128 px, 8192 codes, the dVAE's widths 256·(1, 2, 4, 8), two blocks per group.
  runlocal    (add to any preset) a few steps on a small batch, to check a setup end to end.

The blocks are the other tasks' (configs/common.py): `model` (the tokenizer: kind, codebook and
widths), `optim` (Adam, warm-up then cosine decay), `data` (frames and the batch), `train`
(length, logging, checkpoints), and the task's own block `tokenizer` (the VQ objective).
`data.videos` is a text file of video paths (one a line), a directory (searched recursively for
video files) or a glob pattern; frames are sampled from them at `fps`, shorter side resized to
`size`, center-cropped (`vimpac_jax.tokenizer.vq_data`).
"""

import ml_collections

from vimpac_jax.config_utils import parse_arg
from vimpac_jax.configs import common
from vimpac_jax.training.sharding import mesh_config

PRESETS = {
    "tiny": dict(model=dict(codebook_size=64, embedding_dim=16, widths=(16, 32, 64, 64), n_blk_per_group=1),
                 train=dict(batch_size=16, num_steps=300, learning_rate=3e-3, warmup=20), size=32),
    "small": dict(model=dict(codebook_size=1024, embedding_dim=64, widths=(64, 128, 256, 256), n_blk_per_group=2),
                  train=dict(batch_size=64, num_steps=100_000, learning_rate=3e-4, warmup=2_000), size=128),
    "dalle_like": dict(model=dict(codebook_size=8192, embedding_dim=256, widths=(256, 512, 1024, 2048),
                                  n_blk_per_group=2),
                       train=dict(batch_size=128, num_steps=200_000, learning_rate=3e-4, warmup=5_000), size=128),
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
    # Data parallel only: the tokenizer's parameters are replicated (see optim.flatten_optimizer).
    config.mesh = mesh_config()

    # The model block: vimpac_jax.tokenizer.vq.MODEL_FIELDS, plus the kind and compute dtype.
    config.model = ml_collections.ConfigDict(dict(kind="vq", channels=3, dtype="float32", **spec["model"]))
    # Adam (b2 = 0.99, as common for VQ-VAEs) after global-norm clipping; the learning rate warms
    # up over `warmup` updates (< 1: a fraction of train.num_steps, as in optim_config), then
    # decays to 0 on a cosine (vimpac_jax.tokenizer.vq_train.make_schedule).
    train_spec = spec["train"]
    config.optim = ml_collections.ConfigDict(dict(
        learning_rate=train_spec["learning_rate"], warmup=float(train_spec["warmup"]), b1=0.9, b2=0.99,
        clip_grad_norm=1.0,      # 0 disables it
        flatten_optimizer=True,  # Adam on one raveled vector: fast to compile; replicated params
    ))
    config.data = ml_collections.ConfigDict(dict(
        videos="",                # list file / directory / glob; required
        batch_size=train_spec["batch_size"],  # global batch, in frames, of one update
        fps=2.0,                  # frames sampled per second of video
        size=spec["size"],        # square frame side (a multiple of 8)
        max_frames_per_video=64,  # cap per file, so long videos do not dominate the pool
        max_pool_gib=8.0,         # refuse to cache more decoded frames in memory than this
        workers=4,                # decoding processes (0: decode in this process)
        flip=True,                # random horizontal flips
    ))
    config.train = common.train_config(num_steps=train_spec["num_steps"], log_every=50, checkpoint_every=1_000)
    del config.train.epochs       # frames have no epochs here: train.num_steps is the length
    # The task's own block: the VQ objective (vimpac_jax.tokenizer.vq_train.VQHParams).
    config.tokenizer = ml_collections.ConfigDict(dict(
        commitment_beta=0.25,   # van den Oord et al.'s beta
        ema_decay=0.99,         # codebook EMA decay
        epsilon=1e-5,           # Laplace smoothing of the EMA counts
        restart_threshold=1.0,  # restart codes used by < 1 vector per batch (EMA); <= 0 disables
    ))

    if arg.runlocal:
        config.data.update(batch_size=4, max_frames_per_video=8, workers=0)
        config.optim.warmup = 2.0
        config.train.update(num_steps=20, log_every=1, checkpoint_every=10)
    return config
