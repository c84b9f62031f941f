"""Number of mask blocks: 4, 5, 6 (paper Table 9, block masking ablation; Table 15's block rows).

The paper pre-trains with each number of blocks (analysis recipe, `configs/pretrain.py:small,analysis`)
and fine-tunes; 5 blocks (about 14.5% of 5x16x16 tokens, Table 2) is its choice at 128 px.
Every run has the contrastive loss off (alpha = 0, `pretrain.nce_weight=0.0`): Tables 9 and 15
are pre-trained "with only mask-then-predict" (Appendix F.2.2; Appendix C: alpha = 0 in every
mask-then-predict analysis), so their 5-block row (UCF101 68.3) is Table 16's alpha = 0 row.
Look at: train/mask_ratio (more blocks mask more tokens; `vimpac mask-ratio` gives the induced
ratio at any shape), train/mask_accuracy and train/mlm_loss (a larger masked share is harder to
predict), then fine-tune each workdir (`configs/finetune.py:dataset=ucf101,analysis ...
--config.init_from=RUN`) for the table's downstream accuracy. At `runlocal` size (3x4x4 tokens)
the ratios are much larger than the paper's; only the trend is meaningful there.

  vimpac sweep --config configs/pretrain.py:small,analysis --config.data.train_store=STORE \\
      --sweep configs/sweeps/mask_blocks.py --workdir sweeps/mask_blocks
"""

from vimpac_jax.sweeps import fixed, product, sweep


def get_sweep():
    return product(sweep("pretrain.mask_blocks", [4, 5, 6]),
                   fixed("pretrain.nce_weight", 0.0))  # mask-then-predict only (Appendix F.2.2)
