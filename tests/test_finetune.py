"""The fine-tuning step's gradient accumulation and the test's eval loss (the released
vimpac/finetune.py: `--gradient_accumulation`, `val/loss`)."""

from pathlib import Path

import jax
import numpy as np
import pytest

from vimpac_jax.config_utils import load_config
from vimpac_jax.training import sharding as shd
from vimpac_jax.training.finetune_step import make_finetune_step, view_cross_entropy
from vimpac_jax.training.pretrain_step import init_train_state

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_two_micro_batches_make_the_same_update_as_one():
    config = load_config(["--config", f"{CONFIGS}/finetune.py:runlocal", "--config.model.num_classes=3",
                          "--config.model.num_layers=1", "--config.model.dropout=0.0",
                          "--config.model.attention_dropout=0.0"])
    model_cfg = config.model.to_dict()
    optim_cfg = dict(config.optim.to_dict(), total_steps=10, warmup=0.0, learning_rate=1e-3)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    shape = (8, model_cfg["clip_len"], model_cfg["height"], model_cfg["width"])
    batches = [dict(tokens=rng.integers(0, 8192, shape).astype(np.int32), label=rng.integers(0, 3, 8).astype(np.int32))
               for _ in range(2)]
    start = init_train_state(model_cfg, optim_cfg, jax.random.key(0), mesh)
    start_params = jax.device_get(start.params)
    runs = {}
    for k in (1, 2):
        step = make_finetune_step(model_cfg, optim_cfg, label_smoothing=0.1, micro_batches=k, mesh=mesh)
        state = jax.jit(lambda s: jax.tree.map(lambda x: x.copy(), s))(start)  # the step donates its state
        metrics = []
        for i, batch in enumerate(batches):
            state, m = step(state, batch, jax.random.key(i))
            metrics.append(jax.device_get(m))
        runs[k] = jax.device_get(state.params), metrics
    (params_1, metrics_1), (params_2, metrics_2) = runs[1], runs[2]
    for a, b in zip(metrics_1, metrics_2):
        for name in ("loss", "accuracy", "grad_norm"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
    moved = jax.tree.leaves(jax.tree.map(lambda p, s: np.abs(p - s).max(), params_1, start_params))
    assert max(moved) > 1e-4  # the updates are not trivially zero
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_1, params_2)


def test_micro_batches_that_do_not_divide_the_batch_are_refused(tmp_path):
    from vimpac_jax.data.testing import write_test_store
    from vimpac_jax.tasks.finetune import FinetuneTask

    store = write_test_store(tmp_path / "s", [dict(video_id=f"v{i}", num_frames=4, label=0) for i in range(8)])
    overrides = ["--config", f"{CONFIGS}/finetune.py:runlocal", "--config.model.num_classes=3",
                 f"--config.data.train_store={store}"]
    with pytest.raises(ValueError, match="config.finetune.micro_batches=3"):  # at load: 3 does not divide 4
        load_config([*overrides, "--config.finetune.micro_batches=3"])
    config = load_config(overrides)
    config.finetune.micro_batches = 3  # set in Python after loading: the task checks it too (with the devices)
    with pytest.raises(ValueError, match="config.finetune.micro_batches=3"):
        FinetuneTask(config, shd.make_mesh(devices=jax.devices()[:1]), log=print)


def test_eval_loss_is_the_mean_over_views_of_the_cross_entropy():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]],     # video 0, label 0: views p = 1/2, 1/4
                              [[0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]]))         # video 1, label 2: p = 0.8 twice
    np.testing.assert_allclose(view_cross_entropy(logits, np.array([0, 2])),
                               [-(np.log(0.5) + np.log(0.25)) / 2, -np.log(0.8)], rtol=1e-12)


def test_fine_tuning_from_a_pretrained_run_reports_in_a_few_lines(caplog):
    """What a newcomer sees when fine-tuning from a pre-training run: one line for the heads left
    out of the checkpoint (MLM, projection) and one for the classifier kept initialised, the
    leaves themselves at debug level only; orbax's read-only notice of each restore at debug."""
    import logging

    from vimpac_jax.training import init_from

    f32 = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    target = {"params": {"backbone": {"pos_embed": {"temporal": f32(4, 8)}, "dense": {"kernel": f32(8, 8)}},
                         "classifier": {"dense": {"kernel": f32(8, 3), "bias": f32(3)}}}}
    source = {"params": {"backbone": {"pos_embed": {"temporal": f32(5, 8)}, "dense": {"kernel": f32(8, 8)}},
                         "mlm_head": {f"layer{i}": {"kernel": f32(8, 8)} for i in range(4)},
                         "proj_head": {f"layer{i}": {"kernel": f32(8, 8)} for i in range(20)}}}
    _, report = init_from.adapt_tree(target, source, expected_missing=("/classifier/",),
                                     expected_unused=("/mlm_head/", "/proj_head/"))
    assert len(report["unused"]) == 24
    assert init_from.format_report(report).splitlines() == [
        "init_from: 1 restored, 1 interpolated/shrunk, 2 not in the checkpoint (kept initialised), 24 unused",
        "init_from: interpolated/shrunk to the model's shape: params/backbone/pos_embed/temporal",
        "init_from: kept initialised (not in the checkpoint): params/classifier (2): this task's own head",
        "init_from: left out (not in this model): params/mlm_head (4), params/proj_head (20): heads of the "
        "checkpoint's task that this task does not have"]
    assert len(init_from.report_details(report).splitlines()) == 1 + 2 + 24

    from vimpac_jax.training import checkpointing

    for level, seen in ((logging.INFO, False), (logging.DEBUG, True)):
        caplog.clear()
        # The package logger's own level too: a command run in process before (logs.setup) sets it to INFO.
        with caplog.at_level(level), caplog.at_level(level, logger="vimpac_jax"):
            checkpointing.read_only_manager(Path(__file__).parent).close()
        notices = [r for r in caplog.records if "Given directory is read only" in r.getMessage()]
        assert [r.levelno for r in notices] == ([logging.DEBUG] if seen else [])
