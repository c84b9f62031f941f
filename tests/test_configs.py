"""The shipped presets read back as the paper's Tables 3 and 4."""

from pathlib import Path

import numpy as np
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
    # The released analysis scripts (small_*.sh, Table 7's runs) pass --frame-rate 2 for every set.
    assert an.data.clip_fps == 2.0 and base.data.clip_fps == fps and an.init_from == ""
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
    assert c.model.num_layers == 1 and c.train.num_steps == 10 and c.data.batch_size == 4
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


def test_configs_are_modules_of_the_package_and_edit_no_import_path():
    import sys

    from vimpac_jax.configs import pretrain

    before = list(sys.path)
    c = config("pretrain.py:small")
    assert sys.path == before  # the config files import each other as vimpac_jax.configs.*
    assert pretrain.get_config("small").to_dict() == c.to_dict()


def test_config_paths_resolve_under_the_cwd_first_then_to_the_installed_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the installed ones answer to the same names
    assert config_path_model("configs/pretrain.py:small") == (6, 512)
    assert load_config(["--config=configs/finetune.py:dataset=ssv2"]).model.num_classes == 174
    # A file under the working directory comes first.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pretrain.py").write_text(
        "from vimpac_jax.configs import pretrain\n\n"
        "def get_config(arg=None):\n    c = pretrain.get_config(arg)\n    c.model.num_layers = 3\n    return c\n")
    assert config_path_model("configs/pretrain.py:small") == (3, 512)
    with pytest.raises(ValueError, match=r"configs/nope.py not found .*configs/pretrain.py"):
        load_config(["--config", "configs/nope.py:small"])


def config_path_model(spec):
    m = load_config(["--config", spec]).model
    return m.num_layers, m.hidden_dim


def test_build_model_variants_are_the_configs_model_sizes():
    from vimpac_jax.models.config import MODEL_PRESETS
    from vimpac_jax.models.model import build_model

    # The paper's Small at T=5, 128 px: the variant's defaults are the pre-training config's model.
    assert build_model(variant="small") == build_model(config("pretrain.py:small").model)
    assert build_model(variant="small") != build_model(variant="base")
    model = build_model(variant="base", num_layers=3, clip_len=2)
    assert (model.backbone.num_layers, model.backbone.hidden_dim, model.backbone.clip_len) == (3, 768, 2)
    assert set(MODEL_PRESETS) == {"tiny", "small", "base", "large_half"}
    with pytest.raises(ValueError, match="large_half"):
        build_model(variant="huge")


def test_a_stored_model_block_without_newer_fields_is_completed_by_its_loader_not_by_build_model(tmp_path):
    """A model checkpoint's model_config.json written before fields existed is completed by its
    one loader from the block's definition; build_model fills nothing."""
    import json

    from vimpac_jax import checkpoints
    from vimpac_jax.models.config import model_config
    from vimpac_jax.models.model import build_model

    full = model_config("tiny", clip_len=2, height=2, width=2)
    old = {k: full[k] for k in ("num_layers", "hidden_dim", "num_heads", "clip_len", "height", "width")}

    def stored(model, **record):
        (tmp_path / "ckpt" / "variables").mkdir(parents=True, exist_ok=True)
        (tmp_path / "ckpt" / "model_config.json").write_text(json.dumps({"model": model, "format_version": 1,
                                                                          **record}))
        return tmp_path / "ckpt"

    loaded = checkpoints.load_model_config(stored(old))
    assert loaded == {**model_config().to_dict(), **old}  # model_config's defaults for the rest
    assert build_model(loaded) == build_model(model_config(**old))
    assert build_model(loaded).backbone.embed_lookup == full.embed_lookup and build_model(loaded).proj_dim == 256
    with pytest.raises(ValueError, match=r"model config lacks the field\(s\) \[.*'proj_dim'"):
        build_model(old)
    with pytest.raises(ValueError, match="model_config.json: model config lacks \\['height'\\]"):
        checkpoints.load_model_config(stored({k: v for k, v in old.items() if k != "height"}))
    with pytest.raises(ValueError, match="is of model checkpoint format 2; this vimpac-jax reads format 1 only"):
        checkpoints.load_model_config(stored(old, format_version=2))


def test_the_fine_tuning_fields_have_their_defaults_in_the_base_config_and_older_runs_get_them_by_migrate(tmp_path):
    """variant_set, eval_crops and class_names are completed from `base_config` (their readers
    take no default); a run's config.json of format 1, written without them, is refused naming
    `vimpac migrate`, which adds them at what the readers took for an absent field, after which
    the resume check of the same config passes."""
    import json

    from vimpac_jax import cli
    from vimpac_jax.tasks import multiview
    from vimpac_jax.training import workdir as workdir_lib

    pre = config("pretrain.py:runlocal")
    assert (pre.variant_set, pre.eval_crops, tuple(pre.class_names)) == (None, "three", ())
    assert multiview.eval_crops_of(pre) == "three" and multiview.class_names_of(pre) is None
    ssv2 = config("finetune.py:dataset=ssv2,runlocal")
    assert (ssv2.variant_set, multiview.eval_crops_of(ssv2), multiview.eval_crops_of(ssv2, "three")) == \
        ("finetune_noflip", "center", "three")

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    older = json.loads(pre.to_json_best_effort())
    for name in ("variant_set", "eval_crops", "class_names"):
        del older[name]
    (run / "config.json").write_text(json.dumps({**older, "format_version": 1}))
    with pytest.raises(workdir_lib.RunFormatError, match=f"records run format 1; .* run `vimpac migrate --workdir "
                                                         f"{run}` first"):
        workdir_lib.check_config(run, pre)
    assert cli.main(["migrate", "--workdir", str(run)]) == 0
    migrated = workdir_lib.read_config(run)
    assert (migrated.variant_set, migrated.eval_crops, list(migrated.class_names)) == (None, "three", [])
    workdir_lib.check_config(run, pre)  # the same run resumes


def test_a_config_without_newer_fields_is_completed_once_at_load_from_the_blocks_definitions(tmp_path):
    """A config file written before fields existed (or a block it leaves out) is completed when
    it is loaded, each field from its block's one definition, so the library reads plain fields."""
    from vimpac_jax.configs import common
    from vimpac_jax.training import optimizer as opt
    from vimpac_jax.training import pretrain_step as ps

    spec = tmp_path / "old.py"
    spec.write_text("from vimpac_jax.configs import pretrain\n\n"
                    "def get_config(arg=None):\n    c = pretrain.get_config('small,runlocal')\n"
                    "    del c.optim['warmup'], c.pretrain['dropout_rng'], c.model['embed_lookup'], c['knn']\n"
                    "    return c\n")
    loaded = load_config(["--config", f"{spec}:x"])
    assert loaded.optim.warmup == opt.optim_config().warmup == 0.05  # stated once, in optim_config
    assert loaded.pretrain.dropout_rng == ps.pretrain_config().dropout_rng
    assert loaded.model.embed_lookup == "float32" and loaded.knn.to_dict() == common.base_config("pretrain").knn.to_dict()
    assert opt.warmup_steps(dict(loaded.optim, total_steps=1000)) == 50


def test_a_tokenizer_config_is_completed_and_checked_at_load_as_the_other_tasks(tmp_path):
    """The tokenizer's task too: a file without a block or field is completed from
    configs/common.py `tokenizer_config`; a size it lacks (no default) and bad widths are named."""
    from vimpac_jax.configs import common

    spec = tmp_path / "old_tokenizer.py"
    spec.write_text("from vimpac_jax.configs import tokenizer\n\n"
                    "def get_config(arg=None):\n    c = tokenizer.get_config('tiny,runlocal')\n"
                    "    del c['tokenizer'], c.data['flip'], c.optim['flatten_optimizer']\n"
                    "    if arg == 'sizeless':\n        del c.model['codebook_size']\n"
                    "    if arg == 'widths':\n        c.model.widths = (16, 32, 64)\n"
                    "    return c\n")
    loaded = load_config(["--config", f"{spec}:x"])
    base = common.tokenizer_config()
    assert loaded.tokenizer.to_dict() == base.tokenizer.to_dict() and loaded.data.flip is True
    assert loaded.optim.flatten_optimizer is True and loaded.model.codebook_size == 64  # the preset's, kept
    with pytest.raises(ValueError, match=r"config.model.codebook_size=0 must be >= 2"):
        load_config(["--config", f"{spec}:sizeless"])
    with pytest.raises(ValueError, match=r"config.model.widths=\(16, 32, 64\) must be 4 positive multiples of 4"):
        load_config(["--config", f"{spec}:widths"])


def _rules_with(**changes):
    from vimpac_jax.training import sharding as shd

    return repr(tuple((name, changes.get(name, axes)) for name, axes in shd.LOGICAL_AXIS_RULES))


def test_logical_axis_rules_from_the_config_change_a_parameters_sharding(tmp_path, monkeypatch):
    import flax.linen as nn
    import jax
    from jax.sharding import PartitionSpec as P

    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training import pretrain_step as ps
    from vimpac_jax.training import sharding as shd
    from vimpac_jax.training import train as train_lib

    base = config("pretrain.py:runlocal")
    assert shd.logical_axis_rules(base.mesh) == shd.LOGICAL_AXIS_RULES  # the default table
    # The MLP hidden over fsdp instead of tensor, the model width replicated.
    changed = config("pretrain.py:runlocal", f"--config.mesh.logical_axis_rules={_rules_with(mlp='fsdp', embed=None)}")
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])

    def fc_kernel_spec(cfg):
        with nn.logical_axis_rules(shd.logical_axis_rules(cfg.mesh)):
            sh = ps.train_state_shardings(cfg.model.to_dict(), cfg.optim.to_dict(), mesh)
        return sh.params["backbone"]["layer_0"]["mlp"]["fc"]["kernel"].spec

    assert fc_kernel_spec(base) == P("fsdp", "tensor")
    assert fc_kernel_spec(changed) == P(None, "fsdp")
    # `vimpac train` makes the config's rules the active ones for the whole run.
    seen = []
    monkeypatch.setattr(train_lib, "_train_locked", lambda *a, **k: seen.append(shd.active_rules()) or {})
    train_lib.train(changed, tmp_path / "run", make_task)
    assert seen == [shd.logical_axis_rules(changed.mesh)] and dict(seen[0])["mlp"] == "fsdp"
    assert shd.active_rules() == shd.LOGICAL_AXIS_RULES  # and only for the run
    with pytest.raises(ValueError, match=r"config.mesh.logical_axis_rules: rule 'mlp' maps to 'model'"):
        shd.logical_axis_rules(config("pretrain.py:runlocal",
                                      f"--config.mesh.logical_axis_rules={_rules_with(mlp='model')}").mesh)


# ------------------------------------------------------------------------------------------------
# What the presets require of a store, checked before anything compiles (vimpac_jax/tasks/).


def finetune_task(tmp_path, dataset, *, fps, variants=("r32_center_noflip",), eval_fps=None, overrides=()):
    import jax

    from vimpac_jax.data.testing import write_test_store
    from vimpac_jax.training import sharding as shd
    from vimpac_jax.tasks.finetune import FinetuneTask

    videos = [dict(video_id=f"v{i}", num_frames=12, label=i % 3, variants=variants) for i in range(4)]

    def store(name, fps):
        path = tmp_path / name
        return path if path.exists() else write_test_store(path, videos, fps=fps, chunk_frames=4)

    flags = [f"--config.data.train_store={store(f'train_{dataset}_{fps}', fps)}"]
    if eval_fps is not None:
        flags.append(f"--config.data.eval_store={store(f'val_{eval_fps}', eval_fps)}")
    c = config(f"finetune.py:dataset={dataset},runlocal", *flags, *overrides)
    return FinetuneTask(c, shd.make_mesh(devices=jax.devices()[:1]), log=lambda *a: None)  # runlocal's 1 device


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


def test_the_tokenizer_task_has_the_blocks_of_the_others():
    from vimpac_jax.configs import common
    from vimpac_jax.tokenizer import vq_train

    c = config("tokenizer.py:tiny")
    assert {"model", "optim", "data", "train", "tokenizer", "mesh", "seed"} <= set(c.keys())
    assert set(c.train.keys()) == set(common.train_config().keys()) - {"epochs"}  # the loop's own fields
    assert (c.data.batch_size, c.data.workers, c.data.size) == (16, 4, 32)
    # What the VQ training state is built from (vq_train.init_state reads these blocks): the preset's values.
    assert (c.optim.learning_rate, c.train.num_steps, c.optim.warmup, c.optim.b1, c.optim.b2, c.optim.clip_grad_norm,
            c.optim.flatten_optimizer) == (3e-3, 300, 20, 0.9, 0.99, 1.0, True)
    assert dict(c.tokenizer) == dict(commitment_beta=0.25, ema_decay=0.99, epsilon=1e-5, restart_threshold=1.0)
    # `warmup` in updates, or (< 1) a fraction of the run: the schedule peaks at 20, or 30 = 0.1 x 300, updates.
    for warmup, steps in ((20, 20), (0.1, 30)):
        schedule = vq_train.make_schedule(config("tokenizer.py:tiny", f"--config.optim.warmup={warmup}").optim, 300)
        assert float(schedule(steps)) == pytest.approx(3e-3) and float(schedule(steps - 1)) < 3e-3 * (1 - 0.5 / steps)
    assert c.model.codebook_size == 64
    with pytest.raises(ValueError, match=r"optim.warmup=400.0 must be in \[0, train.num_steps=300\]"):
        config("tokenizer.py:tiny", "--config.optim.warmup=400")
    with pytest.raises(ValueError, match="tokenizer.ema_decay=1.0"):
        config("tokenizer.py:tiny", "--config.tokenizer.ema_decay=1.0")


def pretrain_task(tmp_path, *overrides, stores=()):
    """A runlocal PretrainTask; `stores`: (config field, name, fps, labelled) of extra stores, each a
    `frame_index` store (frame t's tokens read t) of 8 videos of 40 frames."""
    import jax

    from vimpac_jax.data.testing import write_test_store
    from vimpac_jax.training import sharding as shd
    from vimpac_jax.tasks.pretrain import PretrainTask

    def store(name, fps, labelled=True):
        videos = [dict(video_id=f"v{i}", num_frames=40, label=i % 2 if labelled else None,
                       variants=("r32_center_noflip",)) for i in range(8)]
        path = tmp_path / name
        return path if path.exists() else write_test_store(path, videos, fps=fps, pattern="frame_index", chunk_frames=8)

    flags = [f"--config.data.train_store={store('pool', 2.0, False)}"]
    flags += [f"--config.{field}={store(name, fps, labelled)}" for field, name, fps, labelled in stores]
    c = config("pretrain.py:runlocal", *flags, *overrides)
    return PretrainTask(c, shd.make_mesh(devices=jax.devices()[:1]), log=lambda *a: None)  # runlocal's 1 device


def frame_steps(batch_tokens):
    """The stored-frame step between consecutive clip frames of `frame_index` tokens [..., T, h, w]."""
    t = batch_tokens[..., 0, 0].reshape(-1, batch_tokens.shape[-3])
    return set(np.diff(t, axis=1).ravel().tolist())


def test_validation_and_knn_clips_are_at_2_fps_whatever_the_store_fps(tmp_path):
    """The released validation and kNN monitor read the 2-fps LMDBs: from the README's 16-fps
    downstream stores that is every 8th stored frame, with the pre-training presets'
    data.clip_fps = None (the training store's own rate)."""
    stores = [("data.eval_store", "val16", 16.0, True), ("knn.train_store", "train16", 16.0, True),
              ("knn.eval_store", "val16", 16.0, True)]
    task = pretrain_task(tmp_path, stores=stores)
    c = task.config
    assert c.data.clip_fps is None and c.pretrain.eval_clip_fps == 2.0 and c.knn.clip_fps == 2.0
    (batch,) = list(task.validation_dataset())[:1]
    assert frame_steps(batch["tokens"]) == {8}
    for index in (task.knn.train_index, task.knn.eval_index):
        assert frame_steps(task.knn.dataset(index)[0]["tokens"][:, 0]) == {8}
    task = pretrain_task(tmp_path, "--config.pretrain.eval_clip_fps=4", "--config.knn.clip_fps=16", stores=stores)
    assert frame_steps(list(task.validation_dataset())[0]["tokens"]) == {4}
    assert frame_steps(task.knn.dataset(task.knn.eval_index)[0]["tokens"][:, 0]) == {1}


@pytest.mark.parametrize("field,rate_field", [("data.eval_store", "pretrain.eval_clip_fps"),
                                              ("knn.train_store", "knn.clip_fps"), ("knn.eval_store", "knn.clip_fps")])
def test_every_store_a_pretraining_run_reads_is_checked_before_it_starts(tmp_path, field, rate_field):
    """A store whose fps cannot give the validation or kNN clip rate is refused when the task is
    made (before config.json is written or anything compiles), naming the field, store and fps."""
    good = {"data.eval_store": ("val16", 16.0, True), "knn.train_store": ("train16", 16.0, True),
            "knn.eval_store": ("val16", 16.0, True)}
    stores = [(f, *(("bad5", 5.0, True) if f == field else good[f])) for f in good]
    with pytest.raises(ValueError, match=rf"config\.{field}=.*bad5 holds frames at 5 fps, which cannot give clips "
                                         rf"at config\.{rate_field}=2"):
        pretrain_task(tmp_path, stores=stores)


def test_knn_stores_must_be_labelled_and_come_in_pairs(tmp_path):
    with pytest.raises(ValueError, match=r"config\.knn\.train_store=.*unlabelled: videos without a label"):
        pretrain_task(tmp_path, stores=[("knn.train_store", "unlabelled", 2.0, False),
                                        ("knn.eval_store", "val2", 2.0, True)])
    with pytest.raises(ValueError, match=r"config\.knn\.eval_store is set but config\.knn\.train_store is not"):
        pretrain_task(tmp_path, stores=[("knn.eval_store", "val2", 2.0, True)])


def test_released_recipe_rows_validation_batch_cadence_and_accumulation(tmp_path):
    """large_frame256cont.sh validates int(1 * 1.5) = 1 video per GPU of 64: 64 videos; every
    pre-training script validates each epoch (--eval-per-epochs 1) when it has held-out stores;
    large_frame256_ucf101.sh fine-tunes 2 videos per GPU and accumulates the rest of 128."""
    assert config("pretrain.py:large_half,stage2").pretrain.eval_batch_size == 64
    assert config("pretrain.py:large_half").pretrain.eval_batch_size == 0  # stage 1: 1.5 x the 128-video micro-batch
    for spec in ("pretrain.py:small", "pretrain.py:large_half,stage2", "pretrain.py:small,analysis"):
        assert config(spec).train.eval_every_epochs == 1.0 and config(spec).train.eval_every == 0
    assert config("finetune.py:dataset=ucf101,model=large_half").finetune.videos_per_device == 2
    assert config("finetune.py:dataset=ucf101,model=large_half,analysis").finetune.videos_per_device == 0

    # 8 videos of the eval store, runlocal's 4-video batches of the 8-video pool: 2 steps an epoch.
    val = ("data.eval_store", "val16", 16.0, True)
    task = pretrain_task(tmp_path, stores=[val])
    assert task.eval_every == 2 and [s for s in range(1, 7) if task.evaluation_due(s)] == [2, 4, 6]
    assert pretrain_task(tmp_path, "--config.train.eval_every=3", stores=[val]).eval_every == 3
    assert not any(pretrain_task(tmp_path).evaluation_due(s) for s in range(1, 7))  # nothing to evaluate
    with pytest.raises(ValueError, match=r"config\.train\.eval_every_epochs=-1\.0 must be >= 0"):
        config("pretrain.py:runlocal", "--config.train.eval_every_epochs=-1")

    ft = finetune_task(tmp_path, "ucf101", fps=2.0, overrides=("--config.finetune.videos_per_device=2",))
    assert ft.micro_batches == 4 // 2  # runlocal's 4-video batch, 2 per device on this 1-device mesh
    with pytest.raises(ValueError, match=r"videos_per_device=3 on 1 data x fsdp devices does not divide "
                                         r"config\.data\.batch_size=4"):
        finetune_task(tmp_path, "ucf101", fps=2.0, overrides=("--config.finetune.videos_per_device=3",))


# A fault probe's values (issue 24, item 6): each ran to the end with exit 0, ended in a reshape
# traceback (hidden_dim=63) or grew to 24 GB until the OOM killer came (mask_blocks=100000).
ABSURD = [("model.num_layers", "0"), ("optim.warmup", "2.0"), ("optim.clip_grad_norm", "-1"),
          ("optim.learning_rate", "-1"), ("optim.learning_rate", "nan"), ("model.hidden_dim", "63"),
          ("pretrain.mask_blocks", "100000"), ("seed", "-1"), ("model.dropout", "1.0"),
          ("pretrain.micro_batches", "3"), ("data.batch_size", "0"), ("knn.k", "0")]


@pytest.mark.parametrize("field,value", ABSURD)
def test_an_absurd_value_is_refused_at_load_naming_its_field(field, value):
    with pytest.raises(ValueError, match=rf"^config\.{field}={value}(\.0)? must be "):
        config("pretrain.py:small,runlocal", f"--config.{field}={value}")


def test_the_probes_values_are_refused_with_what_was_expected():
    def refusal(*overrides):
        with pytest.raises(ValueError) as e:
            config("pretrain.py:small,runlocal", *overrides)
        return str(e.value)

    assert "heads" in refusal("--config.model.hidden_dim=63")  # 2 heads (tiny) do not divide 63
    assert "heads" in refusal("--config.model.hidden_dim=32", "--config.model.num_heads=None")  # 32 // 64 = 0 heads
    assert "the clip's 48 tokens" in refusal("--config.pretrain.mask_blocks=49")  # runlocal clips: 3 x 4 x 4
    config("pretrain.py:small,runlocal", "--config.pretrain.mask_blocks=48")
    assert "a fraction" in refusal("--config.optim.warmup=1.0")
    # Every problem at once, each with its field.
    both = refusal("--config.optim.learning_rate=-1", "--config.model.num_layers=0")
    assert "config.optim.learning_rate=-1.0" in both and "config.model.num_layers=0" in both
    # The tokenizer's warm-up counts updates (< 1: a fraction) within its run.
    assert "train.num_steps=20" in refusal_of("tokenizer.py:tiny,runlocal", "--config.optim.warmup=21")
    config("tokenizer.py:tiny,runlocal", "--config.optim.warmup=20")


def refusal_of(spec, *overrides):
    with pytest.raises(ValueError) as e:
        config(spec, *overrides)
    return str(e.value)


def test_a_field_no_block_has_is_refused_with_the_nearest_name(tmp_path):
    """A config file can add fields to its blocks (the file's ConfigDict is not locked yet); one
    that nothing reads is a typo that would silently train with the default."""
    spec = tmp_path / "mine.py"
    spec.write_text("from vimpac_jax.configs import pretrain\n\n"
                    "def get_config(arg=None):\n    c = pretrain.get_config('small,runlocal')\n"
                    "    c.optim.learning_rat = 1e-3\n    c.pretrian = {}\n    return c\n")
    message = refusal_of_file(spec)
    assert "config.optim.learning_rat is not a field of config.optim; did you mean learning_rate?" in message
    assert "config.pretrian is not a field of a config; did you mean pretrain?" in message


def refusal_of_file(path):
    with pytest.raises(ValueError) as e:
        load_config(["--config", f"{path}:x"])
    return str(e.value)


def test_every_shipped_preset_passes_the_check():
    from vimpac_jax import config_schema
    from vimpac_jax.configs import demo, finetune, pretrain, tokenizer

    variants = [(pretrain, f"{m}{x}") for m in pretrain.PRESETS for x in ("", ",stage2", ",analysis", ",runlocal")]
    variants += [(finetune, f"dataset={d},model={m}{x}") for d in finetune.DATASETS for m in ("small", "large_half")
                 for x in ("", ",analysis", ",scratch", ",runlocal")]
    variants += [(tokenizer, f"{p}{x}") for p in tokenizer.PRESETS for x in ("", ",runlocal")]
    variants += [(demo, f"stage={s},preset={p}") for s in ("tokenizer", "pretrain", "finetune") for p in demo.PRESETS]
    refused = {f"{module.__name__}:{arg}": config_schema.problems(module.get_config(arg)) for module, arg in variants}
    assert {k: v for k, v in refused.items() if v} == {}


def test_train_from_python_checks_the_config_before_touching_the_workdir(tmp_path):
    from vimpac_jax.configs import pretrain
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training import train as train_lib

    c = pretrain.get_config("small,runlocal")
    c.optim.warmup = 2.0
    with pytest.raises(ValueError, match=r"config.optim.warmup=2.0 must be"):
        train_lib.train(c, tmp_path / "w", make_task)
    assert not (tmp_path / "w").exists()


def test_vimpac_train_refuses_an_absurd_value_with_one_error_line(tmp_path, capsys):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "train", "--config", "configs/pretrain.py:runlocal", "--workdir", tmp_path / "w",
                           f"--config.data.train_store={tmp_path / 'store'}", "--config.pretrain.mask_blocks=100000")
    assert code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("vimpac train: error: config.pretrain.mask_blocks=100000 must be"), \
        err[-2000:]
    assert not (tmp_path / "w").exists()
