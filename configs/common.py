"""Pieces shared by the config files (big_vision style: plain functions returning ConfigDicts)."""

import ml_collections

# The paper's Table 3 models. Heads = hidden_dim // 64; T=5, 128 px (16x16 tokens) in pre-training.
MODEL_PRESETS = {
    "tiny": dict(num_layers=2, hidden_dim=64, proj_layers=2, proj_hidden_dim=128),
    "small": dict(num_layers=6, hidden_dim=512, proj_layers=2, proj_hidden_dim=2048),
    "base": dict(num_layers=12, hidden_dim=768, proj_layers=2, proj_hidden_dim=4096),
    "large_half": dict(num_layers=24, hidden_dim=1024, halve_att=True, halve_mlp=True,
                       proj_layers=3, proj_hidden_dim=4096),
}


def model_config(preset: str, *, task: str = "pretrain", clip_len: int = 5, frame_size: int = 128,
                 num_classes: int = 0) -> ml_collections.ConfigDict:
    """The `config.model` block read by `vimpac_jax.models.model.build_model`."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"model preset must be one of {sorted(MODEL_PRESETS)}, got {preset!r}")
    m = ml_collections.ConfigDict(dict(
        task=task,
        num_layers=0, hidden_dim=0,
        clip_len=clip_len, height=frame_size // 8, width=frame_size // 8,
        layout="T,H|W", num_heads=ml_collections.FieldReference(None, field_type=int),
        pos_emb="hw_separation", pre_ln=False, halve_att=False, halve_mlp=False,
        dropout=0.1, attention_dropout=0.1, vocab_size=8197,
        dtype="float32", remat=False,
        attention_impl=ml_collections.FieldReference(None, field_type=str),
        proj_layers=2, proj_hidden_dim=2048, proj_dim=256,
        num_classes=num_classes, last_dropout=0.0,
    ))
    m.update(MODEL_PRESETS[preset])
    return m
