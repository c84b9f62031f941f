"""Number of mask blocks: 4, 5, 6 (paper Table 9, block masking ablation).

The paper pre-trains with each number of blocks (analysis recipe, `configs/pretrain.py:small,analysis`)
and fine-tunes; 5 blocks (about 14.5% of 5x16x16 tokens, Table 2) is its choice at 128 px.
Look at: train/mask_ratio (more blocks mask more tokens; `vimpac mask-ratio` gives the induced
ratio at any shape), train/mask_accuracy and train/mlm_loss (a larger masked share is harder to
predict), then fine-tune each workdir (`configs/finetune.py ... --config.init_from=RUN`) for the
table's downstream accuracy. At `runlocal` size (3x4x4 tokens) the ratios are much larger than
the paper's; only the trend is meaningful there.

  vimpac sweep --config configs/pretrain.py:small,analysis --config.data.train_store=STORE \\
      --sweep configs/sweeps/mask_blocks.py --workdir sweeps/mask_blocks
"""

from vimpac_jax.sweeps import sweep


def get_sweep():
    return sweep("pretrain.mask_blocks", [4, 5, 6])
