"""The fine-tuning task (`config.task='finetune'`): a classifier on a labelled token store,
tested by the multi-view test (`tasks/multiview.py`)."""

from typing import Optional

import numpy as np

from vimpac_jax.data import pipelines
from vimpac_jax.tasks.multiview import evaluate_classifier
from vimpac_jax.tasks.store_task import StoreTask, check_store_fits, check_variant_set, split_variants
from vimpac_jax.training import sharding as shd
from vimpac_jax.training.finetune_step import make_eval_step, make_finetune_step


def finetune_micro_batches(config, shards: int) -> int:
    """Micro-batches of a fine-tuning update (`shards`: the data x fsdp devices):
    config.finetune.micro_batches, or, when config.finetune.videos_per_device is set (the released
    --bs-per-gpu: gradient_accumulation = batch / devices / bs_per_gpu), the count that gives each
    device that many videos. ValueError when they do not split config.data.batch_size."""
    micro_batches = int(config.finetune.micro_batches)
    per_device = int(config.finetune.videos_per_device)
    if per_device:
        if int(config.data.batch_size) % (per_device * shards):
            raise ValueError(f"config.finetune.videos_per_device={per_device} on {shards} data x fsdp devices "
                             f"does not divide config.data.batch_size={config.data.batch_size}")
        micro_batches = int(config.data.batch_size) // (per_device * shards)
    if micro_batches < 1 or int(config.data.batch_size) % (micro_batches * shards):
        raise ValueError(f"config.finetune.micro_batches={micro_batches} must be >= 1 and split "
                         f"config.data.batch_size={config.data.batch_size} into micro-batches that divide over "
                         f"the {shards} data x fsdp devices")
    return micro_batches


class FinetuneTask(StoreTask):
    name = "finetune"

    def __init__(self, config, mesh, *, log):
        super().__init__(config, mesh, log=log)
        self.items_per_step = int(config.data.batch_size)
        shards = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
        self.micro_batches = micro_batches = finetune_micro_batches(config, shards)
        if int(config.finetune.videos_per_device):
            log(f"fine-tuning: {config.data.batch_size}-video updates in {micro_batches} micro-batch(es) of "
                f"{config.finetune.videos_per_device} video(s) per device (config.finetune.videos_per_device)")
        check_variant_set(self.index.select_variants(split_variants(config.data.train_variants)),
                          config.variant_set)
        self.step = make_finetune_step(self.model_cfg, self.optim_cfg,
                                       label_smoothing=float(config.finetune.label_smoothing),
                                       micro_batches=micro_batches, mesh=mesh, state_shardings=self.state_shardings)
        num_classes = int(self.model_cfg["num_classes"])
        if num_classes <= 0:
            raise ValueError("config.model.num_classes must be > 0 for fine-tuning")
        labels = self.index.labels
        if (labels < 0).any() or labels.max() >= num_classes:
            raise ValueError(f"config.data.train_store={config.data.train_store}: labels must be in "
                             f"[0, {num_classes}) (config.model.num_classes), found {labels.min()}..{labels.max()}")
        self.eval_index = None
        if config.data.eval_store:
            self.eval_index = pipelines.load_index(config.data.eval_store)
            check_store_fits(self.eval_index, self.model_cfg, "data.eval_store", clip_fps=config.data.clip_fps)
        # One jitted test function for the run: each evaluation reuses its compilation.
        self.eval_step = make_eval_step(self.model_cfg, mesh)

    def evaluate(self, state, *, step: Optional[int] = None, num_clips: Optional[int] = None,
                 crops: Optional[str] = None, full: bool = False) -> dict:
        if self.eval_index is None:
            return {}
        result = evaluate_classifier(self.config, self.mesh, self.eval_index, state.params, num_clips=num_clips,
                                     crops=crops, eval_step=self.eval_step)
        return result if full else {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"]}
