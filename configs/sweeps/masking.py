"""Block masking vs i.i.d. masking (paper Table 8).

Run 0 masks the union of `mask_blocks` random 3-D boxes (the paper's method, §5 of the
reference); run 1 masks every token independently with probability 0.15, the BERT-style
baseline. Look at: train/mask_ratio (comparable, about 15%, at the paper's shapes),
train/mask_accuracy and train/mlm_loss (i.i.d. masking is far easier to solve from neighbouring
tokens, so its pre-training accuracy is higher), and the fine-tuned accuracy, which the table
shows is better with block masking.

  vimpac sweep --config configs/pretrain.py:small,analysis --config.data.train_store=STORE \\
      --sweep configs/sweeps/masking.py --workdir sweeps/masking
"""

from vimpac_jax.sweeps import chain, fixed, product


def get_sweep():
    return chain(
        fixed("pretrain.mask_kind", "block"),
        product(fixed("pretrain.mask_kind", "iid"), fixed("pretrain.mask_prob", 0.15)),
    )
