"""Training a VQ tokenizer of this project's own (`vimpac_jax.tokenizer.vq`) on video frames.

`vimpac train --config configs/tokenizer.py:PRESET[,runlocal] --workdir W --config.data.videos=LIST`

Presets:
  tiny        CPU seconds: 32 px frames, 64 codes, widths 16/32/64/64, one block per group.
  small       128 px, 1024 codes, widths 64/128/256/256.
  dalle_like  128 px, 8192 codes, the dVAE's widths 256·(1, 2, 4, 8), two blocks per group.
  runlocal    (add to any preset) a few steps on a small batch, to check a setup end to end.

The blocks (configs/common.py `tokenizer_config`, each field's one default): `model` (the
tokenizer: kind, codebook and widths), `optim` (Adam, warm-up then cosine decay), `data` (frames
and the batch), `train` (length, logging, checkpoints), and the task's own block `tokenizer` (the
VQ objective); a preset sets the size and the length.
`data.videos` is a text file of video paths (one a line), a directory (searched recursively for
video files) or a glob pattern; frames are sampled from them at `fps`, shorter side resized to
`size`, center-cropped (`vimpac_jax.tokenizer.vq_data`).
"""

import ml_collections

from vimpac_jax.config_utils import parse_arg
from vimpac_jax.configs import common

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
    spec, train_spec = PRESETS[preset], PRESETS[preset]["train"]
    config = common.tokenizer_config()  # every block at its defaults; the preset's size and length
    config.preset = preset
    config.model.update(spec["model"])
    config.optim.update(learning_rate=train_spec["learning_rate"], warmup=float(train_spec["warmup"]))
    config.data.update(batch_size=train_spec["batch_size"], size=spec["size"])
    config.train.num_steps = train_spec["num_steps"]

    if arg.runlocal:
        config.data.update(batch_size=4, max_frames_per_video=8, workers=0)
        config.optim.warmup = 2.0
        config.train.update(num_steps=20, log_every=1, checkpoint_every=10)
    return config
