"""Small tokenizer directories for tests (the token stores are in `vimpac_jax.data.testing`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from vimpac_jax.tokenizer import store, vq


def write_random_vq_tokenizer(directory, *, codes: int, seed: int = 0, embedding_dim: int = 4,
                              widths: Sequence[int] = (8, 8, 8, 8)) -> Path:
    """An untrained VQ tokenizer directory (`tokenizer.vq`, 8x down-sampling) of ``codes`` codes,
    its parameters drawn N(0, 0.1) (no initialiser is compiled): for tests that need a tokenizer of
    some vocabulary or of other weights, not good tokens."""
    config = vq.model_json_config(dict(codebook_size=codes, embedding_dim=embedding_dim, widths=list(widths),
                                       n_blk_per_group=1, channels=3))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), vq.abstract_params(config))
    return store.save_tokenizer(directory, {"kind": vq.KIND, "config": config, "step": 0}, params)
