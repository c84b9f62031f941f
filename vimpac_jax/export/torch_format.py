"""Export to the released PyTorch layout: `classifier.pt` (state_dict) + `args.pickle`.

The names come from `conversion/official_names.py`, the same table the importer uses, so that
`vimpac convert official` of an export gives back exactly the variables exported. Files are
written by `conversion/torch_zip.py`, without PyTorch.

The released code builds its model from `args.pickle` (via its trainer's arguments), so a model
it cannot build is refused unless `force=True`; see `released_incompatibilities`.
"""

import collections
from pathlib import Path
from typing import Any, Mapping, Optional

import flax
import numpy as np

from vimpac_jax.conversion import torch_zip
from vimpac_jax.conversion.official_names import IGNORED_KEY_PATTERN, TIED_KEYS, to_torch_layout, torch_name

WEIGHTS_FILE = "classifier.pt"
ARGS_FILE = "args.pickle"

# `--model` choices of the released trainer (vimpac/param.py): 'efflayout' + one of these.
RELEASED_LAYOUTS = ("T,H,W", "T", "T,H", "T,H|W", "T|H|W", "H|W,T")
RELEASED_PROJ_DIM = 256  # the released CLSMLPHead's output size is fixed

# The released trainer's arguments that the model config does not determine, at the defaults
# of its argument parser (vimpac/param.py), so that every attribute its code reads exists.
_RELEASED_ARG_DEFAULTS: dict[str, Any] = dict(
    load=None, eval_only=False, resume=False, debug=False, tqdm=False, output=".", seed=9595, split_id=1,
    dataset_name="ucf101", num_workers=4, epochs=40, interval=9595, eval_per_epochs=1, save_per_epochs=9595,
    fp16=False, optim="adamw", lr=1e-4, lr_scheduler="linear", warm_up=0.05, beta1=0.9, beta2=0.999,
    epsilon=1e-8, weight_decay=0.05, clip_grad_norm=0.0, gradient_accumulation=1, bs_per_gpu=None,
    batch_size=64, label_smoothing=None, grad_checkpoint=False, frame_rate=None, different_shape=False,
    num_test_clips=5, last_test_clips=None, mask_blocks=-1, mask_rand_replace=False, knn_monitor=False,
    slurm_multinode_dist=False, mlm_weight=1.0, nce_weight=1.0, nce_bn_after_proj=False,
    nce_relevance_range=None,
    epoch=-1,  # the trainer's save_model sets it; -1 is its default ("no epoch")
)


# The released MLM head scores all 8,197 ids. A model trained with `model.mlm_codes` = C scored
# ids [0, C) only, so the bias of ids [C, 8197) never trained: the export writes it as this large
# negative number, which gives those ids a softmax probability of exp(-1e4) ~ 0 under the released
# code (and stays finite in its float16 autocast, max 65504), so its predictions are the model's.
UNSCORED_ID_BIAS = -1e4


class ExportError(ValueError):
    pass


def _effective_heads(cfg: Mapping[str, Any]) -> int:
    return int(cfg["num_heads"] or cfg["hidden_dim"] // 64)


def released_incompatibilities(cfg: Mapping[str, Any]) -> list[str]:
    """Reasons the released PyTorch code cannot build this model ([] when it can)."""
    problems = []
    layout = cfg["layout"]
    if "x" in layout:
        problems.append(f"layout {layout!r} has a joint attention ('x'); the released SingleAttention attends "
                        f"along one axis only, so TxHxW / T,HxW layouts cannot be built")
    elif layout not in RELEASED_LAYOUTS:
        problems.append(f"layout {layout!r} is not one of the released trainer's --model choices "
                        f"{['efflayout' + x for x in RELEASED_LAYOUTS]}")
    if cfg["pre_ln"] and cfg["halve_att"]:
        problems.append("pre_ln with halve_att: the released pre-LN attention output is Linear(d, d) and cannot "
                        "take the halved attention width (the released code crashes on it)")
    if cfg["height"] != cfg["width"]:
        problems.append(f"token grid {cfg['height']}x{cfg['width']} is not square; the released frame_size is one "
                        f"number")
    d = int(cfg["hidden_dim"])
    if d // 64 < 1 or _effective_heads(cfg) != d // 64:
        problems.append(f"{_effective_heads(cfg)} heads at hidden_dim {d}; the released code always uses "
                        f"hidden_dim // 64 = {d // 64}")
    if cfg["task"] == "pretrain" and int(cfg["proj_dim"]) != RELEASED_PROJ_DIM:
        problems.append(f"proj_dim {cfg['proj_dim']}; the released projection head outputs {RELEASED_PROJ_DIM}")
    return problems


def state_dict_from_variables(variables: Mapping[str, Any], cfg: Mapping[str, Any]) -> "collections.OrderedDict[str, np.ndarray]":
    """Our variables -> the released state_dict {name: array in torch layout}.

    A model trained with `mlm_codes` = C gets UNSCORED_ID_BIAS as the MLM bias of ids >= C.
    Tied entries (`mlm_head.decoder.weight` / `.bias`) are the very same arrays as their
    originals, so the writer stores them once and torch loads them sharing memory. Each
    BatchNorm also gets its `num_batches_tracked` counter (int64, 0-d), which we do not keep:
    it is written as 0 (torch reads it only when BatchNorm momentum is None; the released head
    uses the default momentum).
    """
    pre_ln = bool(cfg["pre_ln"])
    state = collections.OrderedDict()
    for path, value in flax.traverse_util.flatten_dict(dict(variables)).items():
        name = torch_name(path, pre_ln)
        if name in state:
            raise ExportError(f"two variables map to the torch name {name} (the second is {'/'.join(path)})")
        state[name] = np.ascontiguousarray(to_torch_layout(path, np.asarray(value)))
    codes = cfg["mlm_codes"]
    if codes is not None and "mlm_head.bias" in state:  # before tying: decoder.bias is the same array
        bias = state["mlm_head.bias"].copy()
        bias[int(codes):] = UNSCORED_ID_BIAS
        state["mlm_head.bias"] = bias
    for name, original in TIED_KEYS.items():
        head = name.split(".")[0] + "."  # only where the head exists: a classifier has no mlm_head
        if original in state and any(k.startswith(head) for k in state):
            state[name] = state[original]
    for name in [n for n in state if n.startswith("cls_head.mlp.bn_") and n.endswith(".running_mean")]:
        counter = name[: -len("running_mean")] + "num_batches_tracked"
        assert IGNORED_KEY_PATTERN.search(counter), counter  # the importer skips exactly these
        state[counter] = np.zeros((), np.int64)
    # Modules in the order the released model registers them, so the file reads like its own.
    rank = {"backbone": 0, "mlm_head": 1, "cls_head": 2, "cls_fc": 3}
    return collections.OrderedDict(sorted(state.items(), key=lambda item: rank.get(item[0].split(".")[0], 4)))


def released_args(cfg: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The fields of the released trainer's argparse.Namespace that describe this model."""
    pretrain = cfg["task"] == "pretrain"
    args = dict(_RELEASED_ARG_DEFAULTS)
    dropout = float(cfg["dropout"])
    args.update(
        layers=int(cfg["num_layers"]),
        hid_dim=int(cfg["hidden_dim"]),
        model="efflayout" + cfg["layout"],
        pos_emb=cfg["pos_emb"],
        pre_activation=bool(cfg["pre_ln"]),
        halve_att=bool(cfg["halve_att"]),
        halve_mlp=bool(cfg["halve_mlp"]),
        frame_size=int(cfg["height"]) * 8,
        clip_len=int(cfg["clip_len"]),
        vocab_size=int(cfg["vocab_size"]) - 5,  # the code adds the 5 special ids
        nce_proj_layers=int(cfg["proj_layers"]),
        nce_proj_hid_dim=int(cfg["proj_hidden_dim"]),
        dropout=dropout,
        last_dropout=float(cfg["last_dropout"] or 0.0),
    )
    if pretrain:
        args["dataset_name"] = "howto100m"
    args.update(overrides or {})
    return args


def export_torch(cfg: Mapping[str, Any], variables: Mapping[str, Any], out_dir, *, force: bool = False,
                 args_overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Write `classifier.pt` and `args.pickle` into the (existing, empty) directory `out_dir`.

    Raises ExportError for a model the released code cannot build, unless `force`.
    Returns a summary: {'tensors': n, 'warnings': [...]}.
    """
    problems = released_incompatibilities(cfg)
    if problems and not force:
        raise ExportError("the released PyTorch code cannot build this model:\n  " + "\n  ".join(problems)
                          + "\n(pass --force to write the files anyway, e.g. for `vimpac convert official`)")
    state = state_dict_from_variables(variables, cfg)
    out_dir = Path(out_dir)
    torch_zip.save_state_dict(state, out_dir / WEIGHTS_FILE)
    torch_zip.save_namespace(released_args(cfg, args_overrides), out_dir / ARGS_FILE)
    warnings = list(problems)
    if cfg["mlm_codes"] is not None and cfg["task"] == "pretrain":
        warnings.append(f"model.mlm_codes={cfg['mlm_codes']}: the MLM bias of the {int(cfg['vocab_size']) - int(cfg['mlm_codes'])} "
                        f"ids it never scored is written as {UNSCORED_ID_BIAS:g}, so the released head gives them "
                        f"probability ~0")
    if float(cfg["attention_dropout"]) != float(cfg["dropout"]):
        warnings.append("attention_dropout differs from dropout; the released code has one dropout rate "
                        "(args.dropout), used for both")
    return {"tensors": len(state), "warnings": warnings}
