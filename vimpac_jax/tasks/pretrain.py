"""The pre-training task (`config.task='pretrain'`): masked token prediction + contrastive
learning on a token store, with held-out validation (`config.data.eval_store`) and the kNN
monitor (`config.knn`, `tasks/knn.py`)."""

from typing import Optional

import jax
import numpy as np

from vimpac_jax.data import pipelines, token_store
from vimpac_jax.tasks.knn import KnnMonitor
from vimpac_jax.tasks.multiview import eval_variant_names
from vimpac_jax.tasks.store_task import StoreTask, check_store_fits
from vimpac_jax.training import sharding as shd
from vimpac_jax.training.pretrain_step import make_pretrain_eval_step, make_pretrain_step


def store_code_range(store: str) -> tuple[int, int, str]:
    """(lowest, highest) code a token store can hold and where that was read: the vocabulary of
    the tokenizer named in its metadata, or else (a store from elsewhere) every stored token."""
    tokenizer = token_store.read_metadata(store).get("tokenizer") or {}
    vocab = (tokenizer.get("config") or {}).get("vocab_size")
    if vocab is not None:
        return 0, int(vocab) - 1, f"its tokenizer's {int(vocab)} codes"
    lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for record in token_store.iter_videos(store):
        tokens = record["tokens"]
        if tokens.size:
            lo, hi = min(lo, int(tokens.min())), max(hi, int(tokens.max()))
    return lo, hi, "its stored tokens"


def _check_mlm_codes(model_cfg: dict, store: str, field: str = "train_store") -> None:
    """model.mlm_codes must cover every code of the store (they are the MLM targets): a larger
    code is a target the head cannot score, a NaN loss, so it is refused before compiling."""
    codes = model_cfg["mlm_codes"]
    if codes is None or not store:
        return
    lo, hi, source = store_code_range(store)
    if hi >= int(codes) or lo < 0:
        raise ValueError(f"config.model.mlm_codes={codes} scores ids [0, {codes}) only, but config.data.{field}={store} "
                         f"holds codes {lo}..{hi} ({source}); set config.model.mlm_codes >= {hi + 1} (or None for all ids)")



def validation_batch_size(config, shards: int) -> int:
    """Videos per held-out validation batch of pre-training: config.pretrain.eval_batch_size, else
    1.5x the micro-batch (the released `bs_per_gpu * 1.5`), rounded up to whole batches over
    `shards` (the data x fsdp devices times the processes)."""
    size = int(config.pretrain.eval_batch_size) or int(
        1.5 * int(config.data.batch_size) // int(config.pretrain.micro_batches))
    return -(-size // shards) * shards


class PretrainTask(StoreTask):
    name = "pretrain"
    loss_name = "total_loss"

    def __init__(self, config, mesh, *, log):
        super().__init__(config, mesh, log=log)
        self.items_per_step = 2 * int(config.data.batch_size)  # clips
        _check_mlm_codes(self.model_cfg, config.data.train_store, "train_store")
        _check_mlm_codes(self.model_cfg, config.data.eval_store, "eval_store")
        self.step = make_pretrain_step(self.model_cfg, self.optim_cfg, config.pretrain.to_dict(), mesh,
                                       state_shardings=self.state_shardings)
        self.eval_index = None
        if config.data.eval_store:
            self._init_validation(config, mesh)
        self.knn = None
        if bool(config.knn.train_store) != bool(config.knn.eval_store):
            given, missing = ("train_store", "eval_store") if config.knn.train_store else ("eval_store", "train_store")
            raise ValueError(f"config.knn.{given} is set but config.knn.{missing} is not: the kNN monitor needs both "
                             "(labelled stores, e.g. UCF101 train and val)")
        if config.knn.train_store and config.knn.eval_store:
            self.knn = KnnMonitor(config, mesh)
        self.knn_every = int(config.knn.every)

    def _init_validation(self, config, mesh):
        """Held-out validation as the released pre-training script: two clips per video of the
        center crop (`only_one_aug`), at config.pretrain.eval_clip_fps (2 fps: the released
        validation reads the 2-fps LMDB), masked and scored in eval mode, batches of 1.5x the
        micro-batch (`bs_per_gpu * 1.5`) unless config.pretrain.eval_batch_size says otherwise."""
        index = pipelines.load_index(config.data.eval_store)
        check_store_fits(index, self.model_cfg, "data.eval_store", clip_fps=config.pretrain.eval_clip_fps,
                         rate_field="pretrain.eval_clip_fps")
        shards = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES])) * self.process_count
        self.eval_batch = validation_batch_size(config, shards)
        if index.num_videos < self.eval_batch:
            raise ValueError(f"config.data.eval_store={config.data.eval_store} holds {index.num_videos} videos, fewer "
                             f"than one validation batch of {self.eval_batch} (config.pretrain.eval_batch_size)")
        self.eval_index = index.select_variants(eval_variant_names(index, "center", None))
        self.eval_step = make_pretrain_eval_step(self.model_cfg, self.optim_cfg, config.pretrain.to_dict(), mesh,
                                                 state_shardings=self.state_shardings)

    def validation_dataset(self):
        """This process's share of the held-out batches: two clips per video at
        config.pretrain.eval_clip_fps, the same ones at every evaluation."""
        c = self.config
        return pipelines.train_dataset(
            self.eval_index, "pretrain", batch_size=self.eval_batch // self.process_count, clip_len=self.model_cfg["clip_len"],
            seed=int(c.seed), clip_fps=c.pretrain.eval_clip_fps, relevance_range=c.data.relevance_range, num_epochs=1)

    def validate(self, state) -> dict:
        """Mean over the held-out batches of the eval step's metrics (the released averaging);
        the same clips and masks at every evaluation. The last N mod B videos are not read."""
        c = self.config
        dataset = self.validation_dataset()
        mask_key = jax.random.key(int(c.seed) + 1)
        totals: dict[str, float] = {}
        for i, local in enumerate(pipelines.make_iterator(dataset, workers=0)):
            metrics = jax.device_get(self.eval_step(state, self.global_batch(local), jax.random.fold_in(mask_key, i)))
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        return {name: total / len(dataset) for name, total in totals.items()}

    def evaluation_due(self, step: int) -> bool:
        periodic = super().evaluation_due(step) and (self.eval_index is not None or self.knn is not None)
        return periodic or bool(self.knn is not None and self.knn_every and step % self.knn_every == 0)

    def evaluate(self, state, *, step: Optional[int] = None, full: bool = False) -> dict:
        """Validation (config.data.eval_store) every train.eval_every steps (or eval_every_epochs),
        the kNN monitor every knn.every steps (0: with validation); both at the end (`full`)."""
        periodic = full or super().evaluation_due(step)
        result = self.validate(state) if self.eval_index is not None and periodic else {}
        if self.knn is not None and (full or (step % self.knn_every == 0 if self.knn_every else periodic)):
            result.update(self.knn(state.params))
        return result
