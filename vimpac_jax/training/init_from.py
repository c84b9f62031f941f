"""Initialise a model from another checkpoint whose shapes may differ (the two-stage pre-training
of paper Table 4, 128 then 256 px).

Used to fine-tune from a pre-trained model (ours or a converted released one) and for the
second pre-training stage at a new frame size. Per leaf of the target tree:
  - same shape: copied;
  - a positional table (`.../pos_embed/...`) of another length: linearly interpolated along
    its rows, as torch's F.interpolate(mode='linear', align_corners=False) in the released code;
  - the token embedding with more rows than the target: shrunk to the first rows (codes come
    first; the special ids follow them);
  - anything else: a mismatch.
The same function adapts optimizer moments (any tree whose leaf paths end with parameter
paths), so the Adam state follows the parameters into the new shape.
"""

from typing import Any, Iterable

import jax
import numpy as np


class InitFromError(ValueError):
    pass


def interpolate_rows(table: np.ndarray, new_rows: int) -> np.ndarray:
    """[n, ...] -> [new_rows, ...], linear with half-pixel centres (align_corners=False)."""
    table = np.asarray(table)
    n = table.shape[0]
    if n == new_rows:
        return table
    src = (np.arange(new_rows) + 0.5) * (n / new_rows) - 0.5
    src = np.maximum(src, 0.0)  # torch clamps negative source coordinates to 0
    lo = np.minimum(np.floor(src).astype(int), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = (src - lo).reshape(-1, *([1] * (table.ndim - 1)))
    return ((1.0 - w) * table[lo] + w * table[hi]).astype(table.dtype)


def path_name(path) -> str:
    """A key path as 'params/backbone/pos_embed/temporal', whatever the containers: a tree restored
    by orbax without a target (dicts, '0'/'1' keys) names its leaves like the original
    (namedtuples, lists) this way."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _flat(tree) -> dict[str, Any]:
    return {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def adapt_leaf(path: str, target_shape: tuple, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if value.shape == tuple(target_shape):
        return value
    same_tail = value.shape[1:] == tuple(target_shape[1:])
    if "pos_embed" in path and same_tail:
        return interpolate_rows(value, target_shape[0])
    if "token_embed" in path and same_tail and value.shape[0] > target_shape[0]:
        return value[: target_shape[0]]
    raise InitFromError(f"{path}: checkpoint shape {value.shape} does not fit the model's {tuple(target_shape)}")


def adapt_tree(target: Any, source: Any, *, expected_missing: Iterable[str] = (),
               expected_unused: Iterable[str] = (), allow_mismatch: bool = False) -> tuple[Any, dict]:
    """Fill `target` (arrays or ShapeDtypeStructs) from `source`; returns (tree, report).

    report: {'restored', 'adapted', 'missing', 'unused'} lists of leaf paths. A missing or
    unused leaf whose path contains none of the `expected_*` substrings is an error unless
    `allow_mismatch`; missing leaves keep the target's value (its initialisation).
    """
    src = _flat(source)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    report = {"restored": [], "adapted": [], "missing": [], "unused": []}
    out, errors = [], []
    for path, leaf in leaves:
        key = path_name(path)
        if key not in src:
            report["missing"].append(key)
            out.append(leaf)
            continue
        try:
            value = adapt_leaf(key, leaf.shape, src[key])
        except InitFromError as e:
            errors.append(str(e))
            out.append(leaf)
            continue
        report["adapted" if np.shape(src[key]) != tuple(leaf.shape) else "restored"].append(key)
        out.append(value.astype(leaf.dtype))
    targets = {path_name(p) for p, _ in leaves}
    report["unused"] = sorted(k for k in src if k not in targets)
    unexpected = [f"missing from the checkpoint: {k}" for k in report["missing"]
                  if not any(e in k for e in expected_missing)]
    unexpected += [f"in the checkpoint but not used: {k}" for k in report["unused"]
                   if not any(e in k for e in expected_unused)]
    if errors or (unexpected and not allow_mismatch):
        raise InitFromError("cannot initialise from the checkpoint:\n  " + "\n  ".join(errors + unexpected) +
                            ("" if errors else "\n(set config.init_from_allow_mismatch=True to accept)"))
    return jax.tree_util.tree_unflatten(treedef, out), report


# The heads one task has and another lacks (classifier; MLM and contrastive projection): the
# leaves `tasks/init_source.py`'s `initialise_from` expects to find missing or unused.
TASK_HEADS = ("classifier", "mlm_head", "proj_head")


def _groups(keys: Iterable[str]) -> str:
    """'params/mlm_head (4), params/proj_head (20)': leaves counted by head (`TASK_HEADS`), or by
    their first two path components."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split("/")
        heads = [i for i, part in enumerate(parts) if part in TASK_HEADS]
        group = "/".join(parts[: heads[0] + 1] if heads else parts[:2])
        counts[group] = counts.get(group, 0) + 1
    return ", ".join(f"{group} ({n})" for group, n in counts.items())


def _why(keys: Iterable[str], heads_reason: str) -> str:
    return heads_reason if all(any(f"/{h}/" in f"/{k}/" for h in TASK_HEADS) for k in keys) else "allowed by " \
        "config.init_from_allow_mismatch"


def format_report(report: dict) -> str:
    """What `adapt_tree` did, in at most four lines: the counts, then what was interpolated, what
    the checkpoint lacks and what it holds that the model has not, by group and why (each leaf:
    `report_details`, logged at debug level)."""
    lines = [f"init_from: {len(report['restored'])} restored, {len(report['adapted'])} interpolated/shrunk, "
             f"{len(report['missing'])} not in the checkpoint (kept initialised), {len(report['unused'])} unused"]
    if report["adapted"]:
        lines.append(f"init_from: interpolated/shrunk to the model's shape: {', '.join(report['adapted'])}")
    if report["missing"]:
        lines.append(f"init_from: kept initialised (not in the checkpoint): {_groups(report['missing'])}: "
                     + _why(report["missing"], "this task's own head"))
    if report["unused"]:
        lines.append(f"init_from: left out (not in this model): {_groups(report['unused'])}: "
                     + _why(report["unused"], "heads of the checkpoint's task that this task does not have"))
    return "\n".join(lines)


def report_details(report: dict) -> str:
    """Every adapted, missing and unused leaf, one per line."""
    return "\n".join(f"  {kind}: {k}" for kind in ("adapted", "missing", "unused") for k in report[kind])
