"""Export the inference function as serialised StableHLO (`jax.export`), weights included.

Directory layout:
  model.stablehlo   `jax.export.Exported.serialize()` bytes of
                    tokens int32 [b, T, h, w] -> {'cls': [b, D], 'logits': [b, classes]}
                    ('logits' only for fine-tuned models), eval mode (no dropout, BatchNorm
                    running statistics), batch size `b` symbolic, variables baked in as constants
  signature.json    inputs, outputs, platforms, the model config and how to call it

Serving needs jax (or any StableHLO runtime) but none of our Python code; jax (de)serialises the
module with `flatbuffers`, an optional dependency of jax (`pip install flatbuffers`, or this
package's `[export]` extra), so the reader needs it too:
    exported = jax.export.deserialize(open("model.stablehlo", "rb").read())
    outputs = exported.call(tokens)          # a dict, as above
Token ids must lie in [0, vocab_size); the graph does not check them (out-of-range ids read
clamped embedding rows). PAD (8193) frames are masked out as attention keys, as in training.
Constants live inside the serialised module, whose flatbuffer is limited to 2 GiB (the
Large-Half model, ~0.9 GB in float32, fits).
"""

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vimpac_jax.constants import MASK_ID, PAD_ID
from vimpac_jax.models.config import complete
from vimpac_jax.models.model import build_model

MODEL_FILE = "model.stablehlo"
SIGNATURE_FILE = "signature.json"
DEFAULT_PLATFORMS = ("cpu", "cuda")


def inference_function(cfg: Mapping[str, Any], variables: Mapping[str, Any]) -> Callable:
    """tokens int32 [B, T, h, w] -> {'cls': [B, D], 'logits': [B, C] (fine-tuned models only)}.

    The attention implementation is left to XLA (`attention_impl=None`, `attention_kernel="xla"`) so that the function
    lowers for every platform, whatever kernel the training config picked.
    """
    cfg = dict(cfg, attention_impl=None, attention_kernel="xla", remat="none")
    model = build_model(cfg)
    finetuned = cfg["task"] == "finetune"
    # device_put, not jnp.asarray per leaf: eagerly, jnp.asarray compiles a program for each array shape.
    variables = jax.device_put(dict(variables))

    def infer(tokens):
        out = model.apply(variables, tokens, train=False)
        return {"cls": out["cls"], **({"logits": out["logits"]} if finetuned else {})}

    return infer


def export_inference(cfg: Mapping[str, Any], variables: Mapping[str, Any],
                     platforms: Sequence[str] = DEFAULT_PLATFORMS) -> "jax.export.Exported":
    """`jax.export` of `inference_function` for int32 [b, T, h, w] with a symbolic batch `b`."""
    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, cfg["clip_len"], cfg["height"], cfg["width"]), jnp.int32)
    return jax.export.export(jax.jit(inference_function(cfg, variables)), platforms=tuple(platforms))(spec)


def _shape_json(shape) -> list:
    return [d if isinstance(d, int) else str(d) for d in shape]


def signature(exported: "jax.export.Exported", cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What a server needs to know to call the module, as JSON-able data."""
    out_tree = jax.tree.unflatten(exported.out_tree, list(exported.out_avals))
    return {
        "format": "jax.export serialized Exported (StableHLO)",
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
        "platforms": list(exported.platforms),
        "inputs": [{"name": "tokens", "shape": _shape_json(exported.in_avals[0].shape),
                    "dtype": str(exported.in_avals[0].dtype),
                    "description": f"token clips [batch, T, h, w]; ids in [0, {cfg['vocab_size']}), "
                                   f"PAD = {PAD_ID}, MASK = {MASK_ID}"}],
        "outputs": {name: {"shape": _shape_json(aval.shape), "dtype": str(aval.dtype)}
                    for name, aval in out_tree.items()},
        "model_config": dict(cfg),
        "usage": "jax.export.deserialize(open('model.stablehlo', 'rb').read()).call(tokens) -> dict of outputs",
    }


def export_stablehlo(cfg: Mapping[str, Any], variables: Mapping[str, Any], out_dir,
                     platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict[str, Any]:
    """Write model.stablehlo and signature.json into the (existing, empty) `out_dir`."""
    exported = export_inference(cfg, variables, platforms)
    try:
        data = exported.serialize()
    except ImportError as e:  # jax serialises with flatbuffers, an optional dependency of jax
        raise ImportError(f"{e}; pip install 'vimpac-jax[export]'") from None
    out_dir = Path(out_dir)
    (out_dir / MODEL_FILE).write_bytes(bytes(data))
    (out_dir / SIGNATURE_FILE).write_text(json.dumps(signature(exported, cfg), indent=2, sort_keys=True) + "\n")
    return {"bytes": len(data), "platforms": list(exported.platforms), "warnings": []}


def load_model_config(out_dir) -> dict[str, Any]:
    """The model block recorded in an export directory's signature.json, completed
    (`models.config.complete`, as `checkpoints.load_model_config`); ValueError naming the file."""
    path = Path(out_dir) / SIGNATURE_FILE
    try:
        config = json.loads(path.read_text()).get("model_config")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not an export's signature ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: no model_config")
    try:
        return complete(config)
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from None


def load_stablehlo(out_dir) -> "jax.export.Exported":
    """Deserialise an export directory's module (for tests and Python servers)."""
    return jax.export.deserialize(bytearray((Path(out_dir) / MODEL_FILE).read_bytes()))


def run_numpy(exported: "jax.export.Exported", tokens: np.ndarray) -> dict[str, np.ndarray]:
    return jax.tree.map(np.asarray, exported.call(jnp.asarray(tokens, jnp.int32)))
