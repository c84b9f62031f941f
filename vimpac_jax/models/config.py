"""The model block (`config.model`): its fields with their defaults, and the model sizes.

`model_config(variant, **overrides)` is the one statement of the fields `build_model` reads and
of their defaults (configs/common.py builds `config.model` with it, the released-checkpoint
importer `conversion/official.py` too), and `MODEL_PRESETS` the size table of
`build_model(variant=...)`, as big_vision's `vit.Model(variant="B/16")`.

A model block is completed once, where it is built or read: a config file by
`config_utils.load_config` (`config_schema.complete`), a model checkpoint's `model_config.json`
by its loader (`checkpoints.load_model_config`: `complete`); `build_model` and everything after
it read plain fields and fill none (`missing_fields` names what an incomplete block lacks).
"""

from typing import Any, Mapping

import ml_collections
import numpy as np

# The paper's Table 3 models (heads = hidden_dim // 64 unless num_heads is set), and a tiny one
# for tests and `runlocal`.
MODEL_PRESETS = {
    "tiny": dict(num_layers=2, hidden_dim=64, num_heads=2, proj_layers=2, proj_hidden_dim=128),
    "small": dict(num_layers=6, hidden_dim=512, proj_layers=2, proj_hidden_dim=2048),
    "base": dict(num_layers=12, hidden_dim=768, proj_layers=2, proj_hidden_dim=4096),
    "large_half": dict(num_layers=24, hidden_dim=1024, halve_att=True, halve_mlp=True,
                       proj_layers=3, proj_hidden_dim=4096),
}

# Fields a model cannot be built without (its size and its clip's token grid): no defaults for
# these when a stored config is read.
REQUIRED = ("num_layers", "hidden_dim", "clip_len", "height", "width")


def model_config(variant: str | None = None, **overrides) -> ml_collections.ConfigDict:
    """The model block: every field's default, then MODEL_PRESETS[variant], then `overrides`.

    Defaults: the released pre-training model at T=5, 128 px (16x16 tokens); without a variant
    the size (num_layers, hidden_dim) is 0 and must be given.
    """
    if variant is not None and variant not in MODEL_PRESETS:
        raise ValueError(f"model variant must be one of {sorted(MODEL_PRESETS)}, got {variant!r}")
    m = ml_collections.ConfigDict(dict(
        task="pretrain",             # 'pretrain' (VimpacPretrainModel) or 'finetune' (VimpacClassifier)
        num_layers=0, hidden_dim=0,
        clip_len=5, height=16, width=16,  # the clip's token grid [T, H, W]
        layout="T,H|W", num_heads=ml_collections.FieldReference(None, field_type=int),
        pos_emb="hw_separation", pre_ln=False, halve_att=False, halve_mlp=False,
        dropout=0.1, attention_dropout=0.1, vocab_size=8197,
        dtype="float32",
        remat="none",                # backbone.REMAT_POLICIES: none, full, dots, dots_no_batch, save:<names>
        # token lookup from the float32 table ("compute_dtype": cast the table first, as before)
        embed_lookup="float32",
        # the layers as one lax.scan over their stacked parameters (compile time; same parameters)
        scan_layers=False,
        attention_impl=ml_collections.FieldReference(None, field_type=str),
        # the axial attention as XLA ops ("xla") or Pallas TPU kernels ("pallas"; interpreted on CPU)
        attention_kernel="xla",
        proj_layers=2, proj_hidden_dim=2048, proj_dim=256,
        # MLM logits over ids [0, mlm_codes) only; None = all vocab_size (the released head).
        mlm_codes=ml_collections.FieldReference(None, field_type=int),
        num_classes=0, last_dropout=0.0,  # fine-tuning
    ))
    if variant is not None:
        m.update(MODEL_PRESETS[variant])
    m.update(overrides)
    return m


def as_dict(cfg: Mapping[str, Any]) -> dict:
    """A model block (a dict or a ConfigDict) as a plain dict."""
    return cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)


def complete(cfg: Mapping[str, Any]) -> dict:
    """A stored model block (a model checkpoint's `model_config.json`) as a dict with every field,
    those it lacks (written before they existed) at `model_config`'s defaults; for the block's
    loader (`checkpoints.load_model_config`), not for the library. KeyError naming a missing
    REQUIRED field."""
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise KeyError(f"model config lacks {missing} (a model's size and token grid have no default)")
    return {**model_config().to_dict(), **as_dict(cfg)}


def missing_fields(cfg: Mapping[str, Any]) -> list[str]:
    """The fields of the model block (`model_config`) that `cfg` lacks: [] for a complete block."""
    return [k for k in model_config().keys() if k not in cfg]


def check_tokens(tokens: np.ndarray, model_config: dict, source: str) -> np.ndarray:
    """Clear errors for token arrays that do not fit the checkpoint, before any compilation."""
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{source}: tokens must be integers, got dtype {tokens.dtype}")
    expected = (model_config["clip_len"], model_config["height"], model_config["width"])
    if tokens.ndim != 4 or tuple(tokens.shape[1:]) != expected:
        raise ValueError(f"{source}: tokens must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                         f"(T, h, w of the checkpoint), got {list(tokens.shape)}")
    vocab = model_config["vocab_size"]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        bad = tokens[(tokens < 0) | (tokens >= vocab)]
        raise ValueError(f"{source}: token ids must be in [0, {vocab}); found {bad.flat[0]} "
                         f"({bad.size} ids out of range)")
    return tokens.astype(np.int32)
