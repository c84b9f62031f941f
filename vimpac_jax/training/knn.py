"""The kNN monitor of pre-training: top-1 of a nearest-neighbour classifier on [CLS] features.

As the released code's UCF101 monitor: embed one clip per video of a labelled train and eval
token store with the current backbone (eval mode), then classify each eval video by a
similarity-weighted vote of its k nearest train videos (cosine similarity, weights
exp(sim / temperature), the InstDisc/MoCo recipe).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vimpac_jax.data import pipelines
from vimpac_jax.models.model import build_model
from vimpac_jax.training import sharding as shd


def knn_top1(train_features, train_labels, eval_features, eval_labels, *, k: int, temperature: float,
             num_classes: int) -> float:
    """Top-1 accuracy (%) of a weighted kNN vote. features [N, D] (any scale), labels [N]."""
    def normalise(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sims = normalise(eval_features) @ normalise(train_features).T  # [E, N]
    k = min(k, sims.shape[1])
    nearest = np.argsort(-sims, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
    votes = np.zeros((len(sims), num_classes))
    np.add.at(votes, (np.arange(len(sims))[:, None], np.asarray(train_labels)[nearest]), weights)
    return float(100.0 * (votes.argmax(1) == np.asarray(eval_labels)).mean())


class KnnMonitor:
    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.model_cfg = config.model.to_dict()
        self.train_index = pipelines.load_index(config.knn.train_store)
        self.eval_index = pipelines.load_index(config.knn.eval_store)
        model = build_model(self.model_cfg)

        def cls_features(params, tokens):  # tokens [B, 1, T, H, W] -> [B, D]
            out = model.apply({"params": params}, tokens[:, 0], train=False, method=_backbone_only)
            return out.astype(jnp.float32)

        self._features = jax.jit(cls_features, out_shardings=shd.replicated(mesh))

    def _embed(self, params, index):
        shards = int(np.prod([self.mesh.shape[a] for a in shd.BATCH_AXES]))
        per_process = max(int(self.config.knn.batch_size) // jax.process_count(), 1)
        per_process = -(-per_process * jax.process_count() // shards) * shards // jax.process_count()
        variants = list(pipelines.default_test_variants(index.variants))[:1]
        dataset = pipelines.eval_dataset(index, batch_size=per_process, clip_len=self.model_cfg["clip_len"],
                                         num_clips=1, clip_fps=self.config.data.clip_fps, variants=variants)
        sharding = shd.batch_sharding(self.mesh)
        feats, labels = np.zeros((index.num_videos, self.model_cfg["hidden_dim"])), index.labels
        for local in pipelines.make_iterator(dataset, workers=0):
            batch = pipelines.global_batch(local, sharding)
            out = np.asarray(self._features(params, batch["tokens"]))
            valid = shd.to_host(batch["valid"], self.mesh)
            feats[shd.to_host(batch["video_index"], self.mesh)[valid]] = out[valid]
        return feats, labels

    def __call__(self, params) -> dict:
        train_f, train_l = self._embed(params, self.train_index)
        eval_f, eval_l = self._embed(params, self.eval_index)
        num_classes = int(max(train_l.max(), eval_l.max())) + 1
        return {"knn_top1": knn_top1(train_f, train_l, eval_f, eval_l, k=int(self.config.knn.k),
                                     temperature=float(self.config.knn.temperature), num_classes=num_classes)}


def _backbone_only(module, tokens, train=False):
    return module.backbone(tokens, deterministic=not train)[0]
