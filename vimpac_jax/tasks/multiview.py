"""The multi-view test of a classifier (the released test: K clips x C crops per video, softmax
scores averaged), its protocol (which clips and crops), and the class names of a run. Used by
the fine-tuning task, `vimpac evaluate`, `vimpac predict` and the exporters."""

from typing import Any, Optional

import jax
import numpy as np

from vimpac_jax.data import pipelines, token_store
from vimpac_jax.tasks.store_task import split_variants
from vimpac_jax.training import sharding as shd
from vimpac_jax.training.finetune_step import accuracy_report, make_eval_step, view_cross_entropy


def class_names_of(config) -> Optional[list[str]]:
    """What a fine-tuning run's labels mean: config.class_names, else the names its training (or
    held-out) store recorded (`vimpac tokenize`: a directory's class folders, a TFDS dataset's
    label names, --class-names); None when neither says (or the stores are gone)."""
    if config.class_names:
        return list(config.class_names)
    for store in (config.data.train_store, config.data.eval_store):
        try:
            recorded = token_store.read_metadata(store).get("class_names") if store else None
        except (OSError, ValueError):
            continue
        if recorded:
            return list(recorded)
    return None


def eval_variant_names(index: pipelines.StoreIndex, crops: Optional[str], explicit: Optional[str]) -> list[str]:
    """The stored variants used as test crops: explicit names, or the no-flip crops at the
    smallest resize (3 crops); `crops='center'` (or 1) keeps the center crop only (SSV2)."""
    return eval_crop_names(index.variants, crops, explicit)


def eval_crop_names(stored, crops: Optional[str], explicit: Optional[str]) -> list[str]:
    """`eval_variant_names` from the stored variant names (a store's metadata, for `vimpac predict`)."""
    if explicit:
        return split_variants(explicit)
    names = list(pipelines.default_test_variants(stored))
    if str(crops) in ("center", "1"):
        center = [n for n in names if "center" in n]
        names = center[:1] or names[:1]
    return names


def eval_crops_of(config, crops: Optional[str] = None) -> str:
    """The multi-view test's crops: `crops` when given, else the run's `config.eval_crops`."""
    return crops or config.eval_crops


def multiview_protocol(config, index: pipelines.StoreIndex, num_clips: Optional[int] = None,
                       crops: Optional[str] = None) -> tuple[int, list[str]]:
    """(K clips per crop, the crop variants' names) of the multi-view test: the arguments, or the
    run's `data.eval_clips` and `eval_crops`."""
    return (int(num_clips or config.data.eval_clips),
            eval_variant_names(index, eval_crops_of(config, crops), config.data.eval_variants))


def multiview_batch_size(config, shards: int) -> int:
    """Videos per batch of the multi-view test: config.data.eval_batch_size rounded up to whole
    batches over `shards` (the data x fsdp devices times the processes)."""
    return -(-int(config.data.eval_batch_size) // shards) * shards


def evaluate_classifier(config, mesh, index: pipelines.StoreIndex, params, *, num_clips: Optional[int] = None,
                        crops: Optional[str] = None, progress=None, eval_step=None) -> dict[str, Any]:
    """The multi-view test: softmax scores averaged over K clips x C crops per video; `loss` is
    the released `val/loss`, the cross entropy (no smoothing) of each view, averaged over a
    video's views, then over videos. progress: a `vimpac_jax.progress.Progress` of videos, given
    the videos of each batch (all processes'). eval_step: `make_eval_step(config.model, mesh)`,
    built here when not given (pass one to reuse its compilation across calls)."""
    model_cfg = config.model.to_dict()
    k, variants = multiview_protocol(config, index, num_clips, crops)
    process_count = jax.process_count()
    shards = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
    global_batch = multiview_batch_size(config, shards * process_count)
    dataset = pipelines.eval_dataset(index, batch_size=global_batch // process_count, clip_len=model_cfg["clip_len"],
                                     num_clips=k, clip_fps=config.data.clip_fps, variants=variants)
    eval_step = eval_step or make_eval_step(model_cfg, mesh)
    probs, losses, labels, videos = [], [], [], []
    for local in pipelines.make_iterator(dataset, workers=0):
        batch = shd.make_global_batch(local, mesh)
        out = eval_step(params, {}, batch["tokens"])
        valid = shd.to_host(batch["valid"], mesh)
        label = shd.to_host(batch["label"], mesh)[valid]
        probs.append(np.asarray(out["probs"])[valid])
        losses.append(view_cross_entropy(np.asarray(out["logits"])[valid], label))
        labels.append(label)
        videos.append(shd.to_host(batch["video_index"], mesh)[valid])
        if progress is not None:
            progress.update(add=int(valid.sum()))
    probs, labels, videos = np.concatenate(probs), np.concatenate(labels), np.concatenate(videos)
    if len(np.unique(videos)) != len(videos) or len(videos) != index.num_videos:
        raise RuntimeError(f"evaluation counted {len(videos)} views of {len(np.unique(videos))} videos; "
                           f"the split has {index.num_videos}")
    report = accuracy_report(probs, labels, class_names_of(config))
    report.update(loss=float(np.concatenate(losses).mean()), num_clips=k, crops=variants, predictions=[
        {"video_id": index.video_ids[v], "label": int(l), "prediction": int(p.argmax()), "score": float(p.max())}
        for v, l, p in zip(videos, labels, probs)])
    return report
