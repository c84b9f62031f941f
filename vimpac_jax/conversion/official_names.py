"""Names of our variables in the released PyTorch layout (the released `vimpac/modeling.py`), both directions.

One function, `torch_name`, maps a path of our variable tree to its state_dict key, so that the
importer (`official.py`) and the exporter use the same table and cannot drift apart.
"""

import re

import numpy as np

_POS = {"cls": "cls_pos_embedding", "temporal": "temporal_pos_embedding", "height": "height_pos_embedding",
        "width": "width_pos_embedding", "spatial": "spatial_pos_embedding", "table": "positional_embedding"}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
_QKV = {"query": "query", "key": "key", "value": "value"}

# Keys of a released state_dict that have no variable of their own here.
TIED_KEYS = {
    "mlm_head.decoder.weight": "backbone.embedding.weight",  # the tied output layer
    "mlm_head.decoder.bias": "mlm_head.bias",  # the same bias tensor, listed twice
}
IGNORED_KEY_PATTERN = re.compile(r"cls_head\.mlp\.bn_\d+\.num_batches_tracked$")


def _index(name: str, prefix: str) -> int:
    if not name.startswith(prefix):
        raise KeyError(name)
    return int(name[len(prefix):])


def torch_name(path: tuple[str, ...], pre_ln: bool) -> str:
    """('params', 'backbone', 'layer_0', 'mlp', 'fc', 'kernel') -> 'backbone.transformer.resblocks.0.mlp.c_fc.weight'."""
    collection, module, *rest = path
    if collection == "batch_stats":
        bn, stat = rest  # module is 'proj_head'
        return f"cls_head.mlp.{bn}.{ {'mean': 'running_mean', 'var': 'running_var'}[stat] }"
    if module == "backbone":
        first = rest[0]
        if first == "cls_token":
            return "backbone.cls_param"
        if first == "token_embed":
            return "backbone.embedding.weight"
        if first == "pos_embed":
            return f"backbone.positional_embedding.{_POS[rest[1]]}"
        if first in ("ln_pre", "ln_post"):
            return f"backbone.{first}.{_LEAF[rest[1]]}"
        layer = f"backbone.transformer.resblocks.{_index(first, 'layer_')}"
        if rest[1] == "ln":
            return f"{layer}.ln.{_LEAF[rest[2]]}"
        if rest[1] == "mlp":
            return f"{layer}.mlp.{ {'fc': 'c_fc', 'proj': 'c_proj'}[rest[2]] }.{_LEAF[rest[3]]}"
        block = f"{layer}.attention_blocks.{_index(rest[1], 'attn_')}"
        if rest[2].startswith("axis_"):
            return f"{block}.attentions.{_index(rest[2], 'axis_')}.attention.{_QKV[rest[3]]}.{_LEAF[rest[4]]}"
        output = block if pre_ln else f"{block}.output"
        return f"{output}.{ {'out': 'dense', 'ln': 'LayerNorm'}[rest[2]] }.{_LEAF[rest[3]]}"
    if module == "mlm_head":
        if rest == ["bias"]:
            return "mlm_head.bias"
        return f"mlm_head.transform.{ {'dense': 0, 'ln': 2}[rest[0]] }.{_LEAF[rest[1]]}"
    if module == "proj_head":
        return f"cls_head.mlp.{rest[0]}.{_LEAF[rest[1]]}"
    if module == "classifier":
        return f"cls_fc.{_LEAF[rest[1]]}"
    raise KeyError("/".join(path))


def to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Our array -> the released tensor layout (Linear kernels [in, out] -> weights [out, in])."""
    return value.T if path[-1] == "kernel" else value


def from_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    return value.T if path[-1] == "kernel" else value
