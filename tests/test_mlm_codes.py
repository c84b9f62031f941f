"""`model.mlm_codes` (an MLM head over the tokenizer's codes only): bad stores and the torch export.

A store holding a code >= mlm_codes has targets the head cannot score (the loss turns NaN), so
training refuses it before compiling; the released torch layout scores all 8,197 ids, so the
export writes the never-trained ids' bias as a large negative number.
"""

from pathlib import Path

import flax
import jax
import numpy as np
import pytest

from vimpac_jax.config_utils import load_config
from vimpac_jax.data.testing import write_test_store
from vimpac_jax.export.torch_format import UNSCORED_ID_BIAS, state_dict_from_variables
from vimpac_jax.models.model import build_model, init_variables
from vimpac_jax.tasks.registry import make_task
from vimpac_jax.training import sharding as shd

REPO = Path(__file__).resolve().parents[1]
VIDEOS = [dict(video_id=f"v{i}", num_frames=5) for i in range(8)]


def pretrain_task(store, codes):
    config = load_config(["--config", str(REPO / "configs/pretrain.py:runlocal"), f"--config.data.train_store={store}",
                          f"--config.model.mlm_codes={codes}"])
    return make_task(config, shd.make_mesh(config.mesh, devices=jax.devices()[:1]), log=lambda m: None)


def test_a_store_with_codes_beyond_mlm_codes_is_refused_before_compiling(tmp_path):
    # A test store names no tokenizer vocabulary, so its tokens are read: random codes in [0, 8192).
    wide = write_test_store(tmp_path / "wide", VIDEOS, seed=0)
    with pytest.raises(ValueError, match=r"mlm_codes=128 scores ids \[0, 128\) only, but config\.data\.train_store=.*wide "
                                         r"holds codes 0\.\.81\d\d \(its stored tokens\).*mlm_codes >= 81\d\d"):
        pretrain_task(wide, 128)
    # frame_index tokens are the frame number and small markers: codes 0..7 fit 128.
    narrow = write_test_store(tmp_path / "narrow", VIDEOS, seed=0, pattern="frame_index")
    assert pretrain_task(narrow, 128).total_steps == 10


def test_torch_export_gives_unscored_ids_a_large_negative_bias():
    cfg = dict(load_config(["--config", str(REPO / "configs/pretrain.py:runlocal")]).model.to_dict(), mlm_codes=128)
    variables = flax.core.unfreeze(flax.linen.unbox(init_variables(build_model(cfg), cfg, jax.random.key(0))))
    trained_bias = np.random.default_rng(0).normal(size=cfg["vocab_size"]).astype(np.float32)
    variables["params"]["mlm_head"]["bias"] = trained_bias
    state = state_dict_from_variables(variables, cfg)
    bias = state["mlm_head.bias"]
    assert bias.shape == (8197,) and state["mlm_head.decoder.bias"] is bias
    np.testing.assert_array_equal(bias[:128], trained_bias[:128])
    assert (bias[128:] == UNSCORED_ID_BIAS).all() and np.isfinite(np.float16(UNSCORED_ID_BIAS))
    # Without mlm_codes every id was trained: the bias is exported as it is.
    full = state_dict_from_variables(variables, dict(cfg, mlm_codes=None))
    np.testing.assert_array_equal(full["mlm_head.bias"], trained_bias)
