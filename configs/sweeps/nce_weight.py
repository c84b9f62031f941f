"""Contrastive loss weight alpha: 0, 0.5, 1, 2 (paper Table 16; total = MLM + alpha * gamma * InfoNCE).

alpha = 0 is pure mask-then-predict (the InfoNCE term is still computed and logged, but it has
no gradient); alpha = 1 is the paper's default. Look at: train/nce_loss (it should fall faster
with larger alpha and stay near its initial log(2B-1)*gamma value at alpha = 0),
train/mlm_loss and train/mask_accuracy (whether the contrastive term hurts token prediction),
and, after fine-tuning each run, the downstream accuracy the table reports. The alpha = 0 run is
the mask-then-predict baseline of Tables 8, 9 and 15 (68.3 on UCF101 in all four tables); the
table's last row, contrastive learning alone (57.1, as Table 7), is one more run with
`--config.pretrain.mlm_weight=0.0`.

  vimpac sweep --config configs/pretrain.py:small,analysis --config.data.train_store=STORE \\
      --sweep configs/sweeps/nce_weight.py --workdir sweeps/nce_weight
"""

from vimpac_jax.sweeps import sweep


def get_sweep():
    return sweep("pretrain.nce_weight", [0.0, 0.5, 1.0, 2.0])
