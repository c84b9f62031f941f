"""The kNN monitor of pre-training: a nearest-neighbour classifier on [CLS] features.

As the released `vimpac/knn_monitor.py` (run on UCF101 by `vimpac/pretrain.py`): embed one
clip per video of a labelled train and eval token store with the current backbone (eval mode),
then classify each eval video by a similarity-weighted vote of its k = 200 nearest train videos
(cosine similarity, weights exp(sim / 0.07), the InstDisc/MoCo recipe), reporting top-1 and
top-5 (%). The clip is the released loaders' `only_one_aug, is_train` one: the center crop, no
flip, at the smallest stored resize, and one random clip of it per video, at 2 fps (the released
loaders read the 2-fps LMDBs: `knn.clip_fps`, checked against both stores before the run). Ours is drawn from a
seeded generator, so every evaluation of a run embeds the same clips (the released code draws
new ones each time); the monitor's curve then moves with the model only.
"""

import jax
import jax.numpy as jnp
import numpy as np

from vimpac_jax.data import pipelines
from vimpac_jax.models.model import build_model
from vimpac_jax.tasks.multiview import eval_variant_names
from vimpac_jax.tasks.store_task import check_store_fits
from vimpac_jax.training import sharding as shd


def knn_accuracy(train_features, train_labels, eval_features, eval_labels, *, k: int, temperature: float,
                 num_classes: int, chunk: int = 1024) -> tuple[float, float]:
    """(top-1, top-5) accuracy (%) of the weighted kNN vote of `knn_monitor.KNNMonitor.knn_predict`.

    features [N, D] / [E, D] (any scale; L2-normalised here), labels int [N] / [E]. Each eval row
    scores class c by the sum of exp(sim / temperature) over its k most similar train rows of
    class c; classes are ranked by that score.
    """
    def normalise(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    bank, train_labels, eval_labels = normalise(train_features), np.asarray(train_labels), np.asarray(eval_labels)
    queries = normalise(eval_features)
    k = min(int(k), len(bank))
    top1 = top5 = 0
    for lo in range(0, len(queries), chunk):  # [chunk, N] similarities at a time
        sims = queries[lo:lo + chunk] @ bank.T
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
        scores = np.zeros((len(sims), num_classes))
        np.add.at(scores, (np.arange(len(sims))[:, None], train_labels[nearest]), weights)
        ranked = np.argsort(-scores, axis=1, kind="stable")
        labels = eval_labels[lo:lo + chunk]
        top1 += int((ranked[:, 0] == labels).sum())
        top5 += int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())
    return 100.0 * top1 / len(queries), 100.0 * top5 / len(queries)


def knn_dataset(index: pipelines.StoreIndex, *, batch_size: int, clip_len: int, clip_fps, seed: int):
    """What the monitor embeds: every video of `index` once, one random clip of its center crop
    (`pipelines.eval_dataset` batches, tokens int32 [batch_size, 1, clip_len, h, w])."""
    return pipelines.eval_dataset(index, batch_size=batch_size, clip_len=clip_len, num_clips=1, clip_fps=clip_fps,
                                  variants=eval_variant_names(index, "center", None), clip_seed=seed)


class KnnMonitor:
    """`monitor(params) -> {'knn_top1', 'knn_top5'}` on `config.knn.train_store` / `eval_store`,
    clips at `config.knn.clip_fps` (2 fps: the released monitor reads the 2-fps LMDBs,
    `vimpac/data.py` with no `frame_rate`)."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.model_cfg = config.model.to_dict()
        self.train_index = self._load_checked(config, "train_store")
        self.eval_index = self._load_checked(config, "eval_store")
        model = build_model(self.model_cfg)

        def cls_features(params, tokens):  # tokens [B, 1, T, H, W] -> [B, D]
            out = model.apply({"params": params}, tokens[:, 0], train=False, method=_backbone_only)
            return out.astype(jnp.float32)

        self._features = jax.jit(cls_features, out_shardings=shd.replicated(mesh))

    def _load_checked(self, config, name: str) -> pipelines.StoreIndex:
        """The index of config.knn.<name>, refused before the run starts when its tokens do not
        fit the model, its fps cannot give config.knn.clip_fps, or a video has no label."""
        index = pipelines.load_index(config.knn[name])
        check_store_fits(index, self.model_cfg, f"knn.{name}", clip_fps=config.knn.clip_fps, rate_field="knn.clip_fps")
        unlabelled = [index.video_ids[i] for i in np.flatnonzero(index.labels < 0)[:3]]
        if unlabelled:
            raise ValueError(f"config.knn.{name}={index.store_dir}: videos without a label (e.g. {unlabelled}); "
                             "the kNN monitor votes with labels: use a labelled store (`vimpac tokenize` of a list "
                             "with labels)")
        return index

    def dataset(self, index: pipelines.StoreIndex):
        """This process's share of what the monitor embeds of `index` (`knn_dataset`), at config.knn.clip_fps."""
        shards = int(np.prod([self.mesh.shape[a] for a in shd.BATCH_AXES]))
        per_process = max(int(self.config.knn.batch_size) // jax.process_count(), 1)
        per_process = -(-per_process * jax.process_count() // shards) * shards // jax.process_count()
        return knn_dataset(index, batch_size=per_process, clip_len=self.model_cfg["clip_len"],
                           clip_fps=self.config.knn.clip_fps, seed=int(self.config.seed))

    def _embed(self, params, index):
        dataset = self.dataset(index)
        feats, labels = np.zeros((index.num_videos, self.model_cfg["hidden_dim"])), index.labels
        for local in pipelines.make_iterator(dataset, workers=0):
            batch = shd.make_global_batch(local, self.mesh)
            out = np.asarray(self._features(params, batch["tokens"]))
            valid = shd.to_host(batch["valid"], self.mesh)
            feats[shd.to_host(batch["video_index"], self.mesh)[valid]] = out[valid]
        return feats, labels

    def __call__(self, params) -> dict:
        train_f, train_l = self._embed(params, self.train_index)
        eval_f, eval_l = self._embed(params, self.eval_index)
        num_classes = int(max(train_l.max(), eval_l.max())) + 1
        top1, top5 = knn_accuracy(train_f, train_l, eval_f, eval_l, k=int(self.config.knn.k),
                                  temperature=float(self.config.knn.temperature), num_classes=num_classes)
        return {"knn_top1": top1, "knn_top5": top5}


def _backbone_only(module, tokens, train=False):
    return module.backbone(tokens, deterministic=not train)[0]
