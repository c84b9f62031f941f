"""The test's eval loss (the released vimpac/finetune.py: `val/loss`)."""

import numpy as np

from vimpac_jax.training.finetune_step import view_cross_entropy


def test_eval_loss_is_the_mean_over_views_of_the_cross_entropy():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]],     # video 0, label 0: views p = 1/2, 1/4
                              [[0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]]))         # video 1, label 2: p = 0.8 twice
    np.testing.assert_allclose(view_cross_entropy(logits, np.array([0, 2])),
                               [-(np.log(0.5) + np.log(0.25)) / 2, -np.log(0.8)], rtol=1e-12)
