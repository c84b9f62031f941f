"""The VQ tokenizer as a task of the shared training program (`vimpac train`, task 'tokenizer').

Frames are decoded once into a pool (`vq_data`), batches come from a checkpointable grain
iterator, the step is `vq_train.train_step` jitted with the batch split over devices and the (small)
state replicated. At the end the tokenizer directory `workdir/tokenizer` is written, and the
reconstruction PSNR and codebook usage on held-out pool frames are reported.

The task reads the blocks every task has (configs/tokenizer.py): `model` (the tokenizer),
`optim`, `data` (frames and the batch), `train` (length), and its own `tokenizer` block (the VQ
objective); `vq_train.init_state` takes them as they are.
"""

from pathlib import Path

import jax
import numpy as np

from vimpac_jax.data import pipelines
from vimpac_jax.tokenizer import vq, vq_data, vq_train
from vimpac_jax.training import sharding as shd


class VQTokenizerTask:
    loss_name = "loss"
    items_name = "frames"
    workdir = None  # set by the loop

    def __init__(self, config, mesh, *, log):
        self.config, self.mesh, self.log = config, mesh, log
        self.total_steps = int(config.train.num_steps)  # >= 1, and the warm-up within it (config_schema)
        self.eval_every = int(config.train.eval_every)
        global_batch = int(config.data.batch_size)
        shards = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
        if global_batch % jax.process_count() or global_batch % shards:
            raise ValueError(f"config.data.batch_size={global_batch} must divide over {jax.process_count()} "
                             f"processes and the {shards} data x fsdp devices")
        self.local_batch = global_batch // jax.process_count()
        self.items_per_step = global_batch
        self.pool = vq_data.frame_pool_from_config(config.data)  # decodes before anything compiles
        if self.pool.skipped:
            log(f"skipped {len(self.pool.skipped)} videos that could not be decoded: "
                + "; ".join(f"{p} ({r})" for p, r in self.pool.skipped[:5]))
        log(f"frame pool: {len(self.pool)} frames of {len(self.pool.paths) - len(self.pool.skipped)} videos")
        self.replicated = shd.replicated(mesh)
        self.batch_sharding = shd.batch_sharding(mesh)
        self.step = jax.jit(vq_train.train_step, in_shardings=(self.replicated, self.batch_sharding, self.replicated),
                            out_shardings=(self.replicated, self.replicated), donate_argnums=0)

    def init_state(self, key):
        c = self.config
        state = vq_train.init_state(c.model, c.optim, c.tokenizer, int(c.train.num_steps), key)
        return jax.device_put(state, self.replicated)

    def iterator(self):
        dataset = vq_data.frame_dataset(self.pool.frames, batch_size=self.local_batch, seed=int(self.config.seed),
                                        flip=bool(self.config.data.flip), process_index=jax.process_index(),
                                        process_count=jax.process_count())
        return pipelines.make_iterator(dataset, workers=0)

    def global_batch(self, local: dict):
        return shd.make_global_batch(local, self.mesh)["images"]

    def evaluation_due(self, step: int) -> bool:
        """Every `train.eval_every` steps (0: at the end only)."""
        return bool(self.eval_every) and step % self.eval_every == 0

    def evaluate(self, state, *, step=None, full: bool = False) -> dict:
        """PSNR and codebook usage on (up to) 256 pool frames; at the end, also saves the tokenizer."""
        frames = vq_data.sample_frames(self.pool.frames, 256, seed=int(self.config.seed) + 1)
        params = jax.device_get(state.tokenizer_params())
        tokens, _ = vq.vq_encode(params, vq.model_json_config(self.config.model), frames)
        recon = np.asarray(vq.vq_decode(params, vq.model_json_config(self.config.model), tokens))
        target = frames.astype(np.float32) / 255.0
        mse = float(np.mean((recon - target) ** 2))
        counts = np.bincount(np.asarray(tokens).ravel(), minlength=int(self.config.model.codebook_size))
        p = counts / counts.sum()
        result = {
            "psnr": float(10 * np.log10(1.0 / max(mse, 1e-12))),
            "recon_mse": mse,
            "mean_frame_mse": float(np.mean((target - target.mean(0)) ** 2)),
            "perplexity": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())),
            "codes_used": float((counts > 0).mean()),
        }
        if full and jax.process_index() == 0:
            out = Path(self.workdir) / "tokenizer"
            vq.save_vq_tokenizer(out, self.config.model, jax.device_get(state), overwrite=True,
                                 metadata={"workdir": str(Path(self.workdir).absolute()), **result})
            self.log(f"wrote the tokenizer to {out} (PSNR {result['psnr']:.2f} dB, "
                     f"{100 * result['codes_used']:.0f}% of codes used, perplexity {result['perplexity']:.1f})")
        return result
