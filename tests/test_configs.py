"""The shipped presets read back as the paper's Tables 3 and 4."""

from pathlib import Path

import pytest

from vimpac_jax.config_utils import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config(spec, *overrides):
    return load_config(["--config", str(CONFIGS / spec), *overrides])


@pytest.mark.parametrize("preset,layers,width,halve", [("small", 6, 512, False), ("base", 12, 768, False),
                                                       ("large_half", 24, 1024, True)])
def test_pretrain_presets_match_tables_3_and_4(preset, layers, width, halve):
    c = config(f"pretrain.py:{preset}")
    m = c.model
    assert (m.num_layers, m.hidden_dim, m.halve_att, m.halve_mlp) == (layers, width, halve, halve)
    assert (m.layout, m.pos_emb, m.clip_len, m.height, m.dropout) == ("T,H|W", "hw_separation", 5, 16, 0.1)
    o = c.optim
    assert (o.learning_rate, o.warmup, o.schedule, o.b1, o.b2, o.eps) == (3e-4, 0.05, "linear", 0.9, 0.98, 1e-8)
    assert (o.weight_decay, o.clip_grad_norm) == (0.05, 1.0)
    assert c.data.batch_size == 1024 and c.train.epochs == 90  # + 10 epochs at 256 px (stage2)
    # 1024-video updates from 128-video micro-batches (255 negatives per clip).
    assert c.data.batch_size // c.pretrain.micro_batches == 128
    assert (c.pretrain.mask_blocks, c.pretrain.mlm_weight, c.pretrain.nce_weight) == (5, 1.0, 1.0)
    assert (m.proj_layers, m.proj_hidden_dim) == ((3, 4096) if preset == "large_half" else (2, m.proj_hidden_dim))


def test_second_stage_and_analysis_recipes():
    s2 = config("pretrain.py:large_half,stage2")
    assert (s2.model.height, s2.train.epochs, s2.pretrain.mask_blocks, s2.init_from_optimizer) == (32, 10, 6, True)
    an = config("pretrain.py:small,analysis")
    assert (an.optim.learning_rate, an.optim.warmup, an.train.epochs) == (1e-3, 0.1, 10)


# Table 4 epochs, Table 5 classes and training videos, Appendix C.1 clip rates (2 fps for the
# longer videos of UCF101 and K400, 4 fps for HMDB51, SSV2, Diving48) and the from-scratch epochs
# (x4 for the small sets, x1.5 for SSV2 and K400), Table 4's "Number of Updates".
FINETUNE = {  # dataset: (epochs, classes, clip fps, scratch epochs, train videos, updates)
    "ssv2": (22, 174, 4.0, 33, 168_913, 29_000),
    "diving48": (50, 48, 4.0, 200, 15_027, 5_800),
    "ucf101": (50, 101, 2.0, 200, 9_537, 3_700),
    "hmdb51": (50, 51, 4.0, 200, 3_570, 1_400),
    "k400": (30, 400, 2.0, 45, 205_418, 48_000),
}


@pytest.mark.parametrize("dataset", sorted(FINETUNE))
def test_finetune_presets_match_table_4(dataset):
    from vimpac_jax.data.pipelines import frame_step

    epochs, classes, fps, _, videos, updates = FINETUNE[dataset]
    for model, lr in (("small", 1e-4), ("base", 1e-4), ("large_half", 5e-5)):
        c = config(f"finetune.py:dataset={dataset},model={model}")
        assert c.train.epochs == epochs and c.model.num_classes == classes and c.optim.learning_rate == lr
        o = c.optim
        assert (o.warmup, o.schedule, o.b1, o.b2, o.weight_decay, o.clip_grad_norm) == (0.1, "linear", 0.9, 0.999,
                                                                                          0.01, 1.0)
        assert c.data.batch_size == 128 and c.model.dropout == 0.1 and c.model.last_dropout == 0.0
        assert c.data.clip_fps == fps and c.data.eval_clips == 10
        # The README's 16-fps downstream stores: every 8th (2 fps) or 4th (4 fps) stored frame.
        assert frame_step(16.0, c.data.clip_fps) == {2.0: 8, 4.0: 4}[fps]
        assert (c.model.clip_len, c.model.height) == ((10, 32) if model == "large_half" else (5, 16))
        assert c.variant_set == ("finetune_noflip" if dataset == "ssv2" else "finetune")
        assert c.eval_crops == ("center" if dataset == "ssv2" else "three")
    # Table 4's update counts (two significant digits) from the epochs and the batch of 128.
    assert c.train.epochs * (videos // c.data.batch_size) == pytest.approx(updates, rel=0.05)


@pytest.mark.parametrize("dataset", sorted(FINETUNE))
def test_analysis_and_scratch_finetuning_variants(dataset):
    """Appendix F: analysis fine-tuning at the pre-training shape (T=5, 128 px), tested with 2 clips
    per crop; Appendix C.1: the no-pre-training baseline trains 4x (small sets) or 1.5x the epochs."""
    epochs, _, fps, scratch_epochs, _, _ = FINETUNE[dataset]
    base = config(f"finetune.py:dataset={dataset}")
    an = config(f"finetune.py:dataset={dataset},analysis")
    assert (an.model.num_layers, an.model.hidden_dim, an.model.clip_len, an.model.height) == (6, 512, 5, 16)
    assert an.data.eval_clips == 2 and base.data.eval_clips == 10 and an.train.epochs == epochs
    assert an.data.clip_fps == fps and an.init_from == ""
    sc = config(f"finetune.py:dataset={dataset},scratch")
    assert sc.train.epochs == scratch_epochs and sc.init_from == "" and sc.data.eval_clips == 10
    assert sc.train.epochs / epochs == (4.0 if dataset in ("ucf101", "hmdb51", "diving48") else 1.5)
    both = config(f"finetune.py:dataset={dataset},analysis,scratch")  # Table 7's first row
    assert (both.train.epochs, both.data.eval_clips, both.model.clip_len) == (scratch_epochs, 2, 5)
    # The analysis shape even for a large model (Table 6 fine-tunes every size at T=5, 128 px).
    assert config(f"finetune.py:dataset={dataset},model=large_half,analysis").model.clip_len == 5


def test_pretrain_update_counts_match_table_4():
    """Table 4's "Number of Updates": 120K for the 100-epoch recipe, 12K for the analysis one,
    over HowTo100M's 1,238,791 videos (Table 5) in 1024-video drop-last batches."""
    per_epoch = 1_238_791 // 1024
    s1, s2 = config("pretrain.py:large_half"), config("pretrain.py:large_half,stage2")
    assert (s1.train.epochs + s2.train.epochs) * per_epoch == pytest.approx(120_000, rel=0.05)
    assert s1.optim.schedule_epochs * per_epoch == pytest.approx(120_000, rel=0.05)
    an = config("pretrain.py:small,analysis")
    assert an.train.epochs * per_epoch == pytest.approx(12_000, rel=0.05)


def test_runlocal_shrinks_and_unknown_fields_are_rejected():
    c = config("finetune.py:dataset=ucf101,model=base,runlocal")
    assert c.model.num_layers == 2 and c.train.num_steps == 10 and c.data.batch_size == 4
    with pytest.raises(ValueError, match="learning_rat"):
        config("pretrain.py:small", "--config.optim.learning_rat=1e-3")
    with pytest.raises(ValueError, match="dataset must be one of"):
        config("finetune.py:dataset=kinetics9000")


def test_two_stage_recipe_is_one_schedule_and_the_papers_negatives():
    """large.sh (--epochs 100 --interval 90) then large_frame256cont.sh (--epochs 100 --interval 10
    --resume): one 100-epoch schedule; negatives from 128-video micro-batches in stage 1 and
    64-video ones in stage 2 and the analysis runs (paper Appendix C.1, Table 11)."""
    from vimpac_jax.training.optimizer import schedule_length

    s1, s2 = config("pretrain.py:large_half"), config("pretrain.py:large_half,stage2")
    for c in (s1, s2):
        assert (c.optim.schedule_epochs, c.optim.warmup, c.optim.schedule, c.optim.learning_rate) == (
            100, 0.05, "linear", 3e-4)
    assert (s1.train.epochs, s2.train.epochs, s2.init_from_optimizer) == (90, 10, True)
    steps_per_epoch = 1_238_791 // 1024  # HowTo100M (Table 5), drop-last batches
    assert schedule_length(s2.optim, steps_per_epoch, 10 * steps_per_epoch) == 100 * steps_per_epoch
    assert s1.data.batch_size // s1.pretrain.micro_batches == 128  # 255 negatives per clip
    assert s2.data.batch_size // s2.pretrain.micro_batches == 64   # 127
    an = config("pretrain.py:small,analysis")
    assert an.data.batch_size // an.pretrain.micro_batches == 64 and an.optim.schedule_epochs is None
    assert schedule_length(an.optim, steps_per_epoch, 10 * steps_per_epoch) == 10 * steps_per_epoch


# ------------------------------------------------------------------------------------------------
# What the presets require of a store, checked before anything compiles (vimpac_jax/training/tasks.py).


def finetune_task(tmp_path, dataset, *, fps, variants=("r32_center_noflip",), eval_fps=None, overrides=()):
    from vimpac_jax.data.testing import write_test_store
    from vimpac_jax.training import sharding as shd
    from vimpac_jax.training.tasks import FinetuneTask

    videos = [dict(video_id=f"v{i}", num_frames=12, label=i % 3, variants=variants) for i in range(4)]

    def store(name, fps):
        path = tmp_path / name
        return path if path.exists() else write_test_store(path, videos, fps=fps, chunk_frames=4)

    flags = [f"--config.data.train_store={store(f'train_{dataset}_{fps}', fps)}"]
    if eval_fps is not None:
        flags.append(f"--config.data.eval_store={store(f'val_{eval_fps}', eval_fps)}")
    c = config(f"finetune.py:dataset={dataset},runlocal", *flags, *overrides)
    return FinetuneTask(c, shd.make_mesh(), log=lambda *a: None)


def test_store_fps_must_give_the_presets_clip_rate(tmp_path):
    # HMDB51 clips are 4 fps: a 2-fps store cannot make them, a 6-fps store only at 6/int(1.5) = 6 fps.
    for fps in (2.0, 6.0):
        with pytest.raises(ValueError, match=rf"train_{'hmdb51'}_{fps}.* holds frames at {fps:g} fps.*"
                                             r"config\.data\.clip_fps=4.*--fps 16"):
            finetune_task(tmp_path, "hmdb51", fps=fps)
    task = finetune_task(tmp_path, "hmdb51", fps=16.0)  # the README's downstream rate: every 4th frame
    assert task.dataset()[0]["tokens"].shape == (4, 3, 4, 4)  # a batch of runlocal's 3-frame clips
    assert task.config.data.clip_fps == 4.0
    with pytest.raises(ValueError, match=r"config\.data\.eval_store=.*val_2\.0 holds frames at 2 fps"):
        finetune_task(tmp_path, "hmdb51", fps=16.0, eval_fps=2.0)
    finetune_task(tmp_path, "ucf101", fps=2.0)  # UCF101's 2 fps from a 2-fps store: every frame


def test_ssv2_never_trains_on_flipped_clips(tmp_path):
    flipping = ("r32_center_noflip", "r32_center_flip")
    with pytest.raises(ValueError, match=r"train_ssv2_16\.0 holds flipped variants \(r32_center_flip\).*"
                                         r"--variants finetune_noflip.*train_variants=r32_center_noflip"):
        finetune_task(tmp_path, "ssv2", fps=16.0, variants=flipping)
    # The unflipped variants of the same store, selected, train; a store of them only as well.
    finetune_task(tmp_path, "ssv2", fps=16.0, variants=flipping, overrides=["--config.data.train_variants=r32_center_noflip"])
    finetune_task(tmp_path / "noflip", "ssv2", fps=16.0)
    finetune_task(tmp_path, "diving48", fps=16.0, variants=flipping)  # flips are fine where a mirror keeps the label
