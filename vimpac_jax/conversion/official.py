"""Import a released VIMPAC checkpoint (`classifier.pt` + `args.pickle`) without PyTorch.

`vimpac convert official SRC DST` reads SRC with the restricted unpickler, builds the model that
`args.pickle` describes, fills every variable from the state_dict and writes a checkpoint of
ours (`vimpac_jax.checkpoints`). Any mismatch is an error: a missing key, a key we do not use,
a tied copy that differs from its original, or a shape that does not fit the architecture.
"""

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

import flax
import numpy as np

from vimpac_jax import checkpoints, exit_codes
from vimpac_jax.conversion import torch_pickle
from vimpac_jax.conversion.official_names import IGNORED_KEY_PATTERN, TIED_KEYS, from_torch_layout, torch_name
from vimpac_jax.models.model import abstract_variables, build_model
from vimpac_jax.models.config import model_config


class ConversionError(ValueError):
    pass


def model_config_from_args(args: Mapping[str, Any], state_dict: Mapping[str, np.ndarray]) -> dict:
    """The model config of a released run, from its args and (for the task) its state_dict keys: a
    complete model block (`models.config.model_config`)."""
    model = args.get("model", "")
    if not str(model).startswith("efflayout"):
        raise ConversionError(f"args.pickle: model={model!r}; only the released 'efflayout<layout>' "
                              f"models are supported")
    missing = [k for k in ("layers", "hid_dim", "clip_len", "frame_size", "vocab_size") if k not in args]
    if missing:
        raise ConversionError(f"args.pickle lacks the field(s) {missing}")
    cfg = dict(
        num_layers=int(args["layers"]),
        hidden_dim=int(args["hid_dim"]),
        clip_len=int(args["clip_len"]),
        height=int(args["frame_size"]) // 8,
        width=int(args["frame_size"]) // 8,
        layout=model[len("efflayout"):],
        pos_emb=args.get("pos_emb", "default"),
        pre_ln=bool(args.get("pre_activation", False)),
        halve_att=bool(args.get("halve_att", False)),
        halve_mlp=bool(args.get("halve_mlp", False)),
        dropout=float(args.get("dropout", 0.1)),
        attention_dropout=float(args.get("dropout", 0.1)),
        vocab_size=int(args["vocab_size"]) + 5,
    )
    if any(k.startswith("cls_fc.") for k in state_dict):
        if "cls_fc.weight" not in state_dict:
            raise ConversionError("state_dict has cls_fc.* keys but no cls_fc.weight")
        cfg.update(task="finetune", num_classes=int(state_dict["cls_fc.weight"].shape[0]),
                   last_dropout=float(args.get("last_dropout", 0.0) or 0.0))
    else:
        cfg.update(task="pretrain", proj_layers=int(args.get("nce_proj_layers", 2)),
                   proj_hidden_dim=int(args.get("nce_proj_hid_dim", 2048)))
    return model_config(**cfg).to_dict()  # the importer builds the block: every other field at its default


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray], model_config: Mapping[str, Any]) -> dict:
    """Fill the variables of `build_model(model_config)` from a released state_dict, strictly."""
    abstract = abstract_variables(build_model(model_config), model_config)
    flat = flax.traverse_util.flatten_dict(abstract)
    used, filled, errors = set(), {}, []
    for path, spec in flat.items():
        name = torch_name(path, model_config["pre_ln"])
        if name not in state_dict:
            errors.append(f"missing key {name} (for {'/'.join(path)}, shape {tuple(spec.shape)})")
            continue
        value = from_torch_layout(path, np.asarray(state_dict[name]))
        if value.shape != tuple(spec.shape):
            errors.append(f"key {name} has shape {np.asarray(state_dict[name]).shape}, the architecture in "
                          f"args.pickle needs {tuple(spec.shape)} (torch layout)")
            continue
        filled[path] = value.astype(spec.dtype)
        used.add(name)
    tied = TIED_KEYS if model_config["task"] == "pretrain" else {}  # only an MLM head has them
    for name, original in tied.items():
        if name in state_dict and original in state_dict:
            if state_dict[name].shape != state_dict[original].shape or not np.array_equal(
                    state_dict[name], state_dict[original]):
                errors.append(f"key {name} should be tied to {original} but differs from it")
            used.add(name)
    unused = sorted(k for k in state_dict if k not in used and not IGNORED_KEY_PATTERN.search(k))
    errors += [f"unused key {k} (shape {np.asarray(state_dict[k]).shape})" for k in unused]
    if errors:
        raise ConversionError("the checkpoint does not fit the architecture in args.pickle:\n  " + "\n  ".join(errors))
    return flax.traverse_util.unflatten_dict(filled)


def check_finite(state_dict: dict, source) -> None:
    """ConversionError naming the tensors holding NaN or infinity: converted, they would give
    NaN features and predictions downstream without a word (no step's loss checks them)."""
    bad = {name: int(np.size(a) - np.isfinite(a).sum()) for name, a in state_dict.items()
           if np.issubdtype(np.asarray(a).dtype, np.floating) and not np.isfinite(a).all()}
    if bad:
        names = ", ".join(f"{name} ({n} of {np.size(state_dict[name])} values)" for name, n in sorted(bad.items())[:4])
        raise ConversionError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values: {names}"
                              f"{', ...' if len(bad) > 4 else ''}; the checkpoint is damaged or diverged")


def convert_official(src, dst, *, overwrite: bool = False) -> tuple[dict, dict]:
    src = Path(src)
    weights, args_file = src / "classifier.pt", src / "args.pickle"
    for f in (weights, args_file):
        if not f.is_file():
            raise ConversionError(f"{f} not found: a released checkpoint directory holds classifier.pt and args.pickle")
    args = torch_pickle.load_plain_pickle(args_file)
    if not isinstance(args, dict):
        raise ConversionError(f"{args_file}: expected a pickled argparse.Namespace, got {type(args).__name__}")
    state_dict = torch_pickle.load_state_dict(weights)
    check_finite(state_dict, weights)
    config = model_config_from_args(args, state_dict)
    variables = variables_from_state_dict(state_dict, config)
    checkpoints.save_model(dst, variables, config, overwrite=overwrite,
                           metadata={"source": str(src.absolute()), "format": "released VIMPAC (PyTorch)"})
    return config, variables


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="vimpac convert official",
                                     description="Import a released VIMPAC checkpoint directory.")
    parser.add_argument("src", help="directory with classifier.pt and args.pickle")
    parser.add_argument("dst", help="output checkpoint directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        config, variables = convert_official(args.src, args.dst, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # ConversionError, unsafe or damaged files, DST exists
        print(f"vimpac convert official: error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    n = sum(int(np.prod(v.shape)) for v in flax.traverse_util.flatten_dict(variables["params"]).values())
    print(f"converted {args.src} -> {args.dst}: task={config['task']} layers={config['num_layers']} "
          f"d={config['hidden_dim']} layout={config['layout']} params={n}")
    return 0
