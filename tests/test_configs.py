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


@pytest.mark.parametrize("dataset,epochs,classes", [("ssv2", 22, 174), ("diving48", 50, 48), ("ucf101", 50, 101),
                                                    ("hmdb51", 50, 51), ("k400", 30, 400)])
def test_finetune_presets_match_table_4(dataset, epochs, classes):
    for model, lr in (("small", 1e-4), ("base", 1e-4), ("large_half", 5e-5)):
        c = config(f"finetune.py:dataset={dataset},model={model}")
        assert c.train.epochs == epochs and c.model.num_classes == classes and c.optim.learning_rate == lr
        o = c.optim
        assert (o.warmup, o.schedule, o.b1, o.b2, o.weight_decay, o.clip_grad_norm) == (0.1, "linear", 0.9, 0.999,
                                                                                          0.01, 1.0)
        assert c.data.batch_size == 128 and c.model.dropout == 0.1 and c.model.last_dropout == 0.0
        assert c.data.clip_fps == 2.0 and c.data.eval_clips == 10
        assert (c.model.clip_len, c.model.height) == ((10, 32) if model == "large_half" else (5, 16))
        assert c.variant_set == ("finetune_noflip" if dataset == "ssv2" else "finetune")
        assert c.eval_crops == ("center" if dataset == "ssv2" else "three")


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
