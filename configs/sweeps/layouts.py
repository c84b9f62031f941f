"""Attention layouts (paper Table 13): T,H|W (default), T,H,W, TxHxW (joint), T,HxW (divided).

Each layer's attention blocks (the released `vimpac/modeling.py`): `T,H|W` temporal then height and width in
parallel; `T,H,W` three sequential axial blocks (more parameters, 35.8M for Small); `TxHxW` full
joint attention (fewest parameters, 23.1M, but quadratic in T*H*W); `T,HxW` TimeSformer's divided
space-time attention. Look at: train/mlm_loss and train/mask_accuracy per layout,
train/steps_per_second and train/items_per_second (summary.csv) for the cost of each, and
`vimpac params` for their sizes. Both losses are on (alpha = 1): the table's post-LN `T,H|W`
entry (69.4) is the default analysis run of Tables 6, 7 and 16. All four divide `runlocal`'s 2
heads; `T|H|W` (3 parallel axes) would need --config.model.num_heads=3 and is not part of the
table.

  vimpac sweep --config configs/pretrain.py:small,analysis --config.data.train_store=STORE \\
      --sweep configs/sweeps/layouts.py --workdir sweeps/layouts
"""

from vimpac_jax.sweeps import sweep


def get_sweep():
    return sweep("model.layout", ["T,H|W", "T,H,W", "TxHxW", "T,HxW"])
