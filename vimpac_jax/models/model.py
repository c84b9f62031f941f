"""Whole models: the pre-training model (backbone + MLM + projection) and the classifier.

`build_model(model_config)` is the one place a model is made from its config (a dict or an
ml_collections ConfigDict with every field of `vimpac_jax.models.config.model_config`: a block
completed where it was built or read, see models/config.py), so that configs, checkpoints and
converted released checkpoints all describe a model the same way.
"""

import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vimpac_jax.models import config as model_config_lib
from vimpac_jax.models.backbone import VideoTransformer
from vimpac_jax.models.heads import ClassifierHead, MLMHead, ProjectionHead

TASKS = ("pretrain", "finetune")

# model.dtype names (config_schema checks against these); float64 is for numerics checks on CPU
# (needs jax_enable_x64).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def gather_positions(hiddens, positions, position_groups: int = 0):
    """hiddens [B, T, H, W, D], positions [B, K] flat row-major indices -> [B, K, D].

    position_groups = G > 0: positions [G, M] index the tokens of G equal consecutive groups of
    clips, flat row-major over (B/G, T, H, W), and must be distinct within a group (what
    `masking.pack_positions` gives): the gradient is then a scatter without atomics. -> [G, M, D].
    """
    if position_groups:
        flat = hiddens.reshape(position_groups, -1, hiddens.shape[-1])
        take = lambda h, p: jnp.take(h, p, axis=0, mode="clip", unique_indices=True)  # noqa: E731
        return jax.vmap(take)(flat, positions)
    flat = hiddens.reshape(hiddens.shape[0], -1, hiddens.shape[-1])
    return jnp.take_along_axis(flat, positions[..., None], axis=1)


class VimpacPretrainModel(nn.Module):
    """Backbone + MLM head (tied to the embedding) + contrastive projection head.

    `__call__(tokens [B, T, H, W], positions [B, K] or None, train, position_groups=0,
    vocab_multiple=1)` returns a dict:
      cls [B, D], hiddens [B, T, H, W, D], mlm_logits [B, K, V] (V = mlm_codes when set; [B, T, H, W, V] when
      positions is None; [G, M, V] for positions [G, M] packed per group of clips, see
      `gather_positions`; V rounded up to `vocab_multiple` with PAD_LOGIT columns, see
      `MLMHead`), cls_proj [B, 256].
    """

    backbone: VideoTransformer
    proj_layers: int = 2
    proj_hidden_dim: int = 2048
    proj_dim: int = 256
    mlm_codes: Optional[int] = None  # score only ids [0, mlm_codes) (MLMHead.scored_codes)

    def setup(self):
        self.mlm_head = MLMHead(self.backbone.hidden_dim, self.backbone.vocab_size, self.backbone.dtype,
                                self.mlm_codes)
        self.proj_head = ProjectionHead(self.proj_layers, self.proj_hidden_dim, self.proj_dim, self.backbone.dtype)

    def __call__(self, tokens, positions: Optional[jax.Array] = None, *, train: bool = False,
                 position_groups: int = 0, vocab_multiple: int = 1):
        cls, hiddens = self.backbone(tokens, deterministic=not train)
        scored = hiddens if positions is None else gather_positions(hiddens, positions, position_groups)
        return {
            "cls": cls,
            "hiddens": hiddens,
            "mlm_logits": self.mlm_head(scored, self.backbone.embedding_table(), vocab_multiple),
            "cls_proj": self.proj_head(cls, train=train),
        }


class VimpacClassifier(nn.Module):
    """Backbone + zero-initialised linear classifier on [CLS]. Returns cls, hiddens, logits."""

    backbone: VideoTransformer
    num_classes: int
    last_dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens, *, train: bool = False):
        cls, hiddens = self.backbone(tokens, deterministic=not train)
        logits = ClassifierHead(self.num_classes, self.last_dropout, self.backbone.dtype,
                                name="classifier")(cls, deterministic=not train)
        return {"cls": cls, "hiddens": hiddens, "logits": logits}


def _require_complete(cfg: Mapping[str, Any]) -> None:
    missing = model_config_lib.missing_fields(cfg)
    if missing:
        raise ValueError(f"model config lacks the field(s) {missing}: a model block is completed where it is built "
                         f"or read (models.config.model_config, config_utils.load_config, "
                         f"checkpoints.load_model_config), not by build_model")


def build_backbone(cfg: Mapping[str, Any]) -> VideoTransformer:
    _require_complete(cfg)
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg['dtype']!r}")
    return VideoTransformer(
        num_layers=cfg["num_layers"],
        hidden_dim=cfg["hidden_dim"],
        clip_len=cfg["clip_len"],
        height=cfg["height"],
        width=cfg["width"],
        layout=cfg["layout"],
        num_heads=cfg["num_heads"],
        pos_emb=cfg["pos_emb"],
        pre_ln=cfg["pre_ln"],
        halve_att=cfg["halve_att"],
        halve_mlp=cfg["halve_mlp"],
        dropout=cfg["dropout"],
        attention_dropout=cfg["attention_dropout"],
        vocab_size=cfg["vocab_size"],
        dtype=DTYPES[cfg["dtype"]],
        remat=cfg["remat"],
        attention_impl=cfg["attention_impl"],
        attention_kernel=cfg["attention_kernel"],
        embed_lookup=cfg["embed_lookup"],
        scan_layers=cfg["scan_layers"],
    )


def build_model(cfg: Optional[Mapping[str, Any]] = None, *, variant: Optional[str] = None, **overrides) -> nn.Module:
    """A model from its config; `cfg['task']` picks pre-training or fine-tuning.

    `build_model(cfg)`: a complete model block (every field of `models.config.model_config`;
    ValueError naming those it lacks). `build_model(variant="small", **overrides)`: a size of
    `models.config.MODEL_PRESETS` with fields overridden, as big_vision's `vit.Model(variant=...)`.
    """
    if cfg is None:
        cfg = model_config_lib.model_config(variant, **overrides)
    elif variant is not None or overrides:
        raise ValueError("build_model: give a config, or a variant and overrides, not both")
    _require_complete(cfg)
    task = cfg["task"]
    backbone = build_backbone(cfg)
    if task == "pretrain":
        mlm_codes = cfg["mlm_codes"]
        if mlm_codes is not None and not 0 < mlm_codes <= backbone.vocab_size:
            raise ValueError(f"model.mlm_codes must be in [1, vocab_size={backbone.vocab_size}], got {mlm_codes}")
        return VimpacPretrainModel(backbone, cfg["proj_layers"], cfg["proj_hidden_dim"], cfg["proj_dim"], mlm_codes)
    if task == "finetune":
        if cfg["num_classes"] < 1:
            raise ValueError(f"model.num_classes must be >= 1 for task 'finetune', got {cfg['num_classes']}")
        return VimpacClassifier(backbone, cfg["num_classes"], cfg["last_dropout"])
    raise ValueError(f"model.task must be one of {TASKS}, got {task!r}")


def init_variables(model: nn.Module, cfg: Mapping[str, Any], rng: jax.Array, batch: int = 2):
    """Initial variables ({'params', 'batch_stats'?}), still boxed with logical axis names.

    One compiled program (called eagerly, flax's init compiles every primitive on its own:
    hundreds of compilations for a small model); inside a caller's jit or eval_shape it is
    traced inline. Compiled once per (model, token shape): models are hashable dataclasses.
    """
    return _init_jit(model, rng, (batch, cfg["clip_len"], cfg["height"], cfg["width"]))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_jit(model: nn.Module, rng: jax.Array, tokens_shape: tuple[int, ...]):
    return model.init({"params": rng, "dropout": rng}, jnp.zeros(tokens_shape, jnp.int32), train=False)


def abstract_variables(model: nn.Module, cfg: Mapping[str, Any]):
    """Shapes and dtypes of the (unboxed) variables, without allocating them."""
    # Traced once per model and grid (tracing the init costs ~0.3 CPU-s for a tiny model, more for
    # a larger one; each checkpoint conversion, export source and classifier load checks against
    # it). A module is hashable: a frozen dataclass of its fields.
    grid = tuple(int(cfg[k]) for k in ("clip_len", "height", "width"))
    return jax.tree.map(lambda s: s, _abstract_variables(model, grid))


@functools.lru_cache(maxsize=16)
def _abstract_variables(model: nn.Module, grid: tuple[int, int, int]):
    cfg = dict(zip(("clip_len", "height", "width"), grid))
    return jax.eval_shape(lambda: nn.unbox(init_variables(model, cfg, jax.random.key(0))))
