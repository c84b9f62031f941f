"""What pre-training and fine-tuning share: a training token store checked against the model,
a mesh, a `TrainState` (fresh or from `config.init_from`), the learning-rate schedule's length,
and the loop's data iterator. The task interface is `tasks/protocol.py`'s `Task`."""

from typing import Optional

import jax
import numpy as np

from vimpac_jax.constants import NUM_CODES
from vimpac_jax.data import pipelines, token_store
from vimpac_jax.tasks.init_source import initialise_from
from vimpac_jax.training import optimizer as optimizer_lib
from vimpac_jax.training import sharding as shd
from vimpac_jax.training import workdir as workdir_lib
from vimpac_jax.training.pretrain_step import TrainState, init_train_state, train_state_shardings


def split_variants(value: Optional[str]) -> Optional[list[str]]:
    """A comma-separated list of stored variant names (config.data.train_variants / eval_variants); None: all."""
    return None if not value else [v.strip() for v in value.split(",") if v.strip()]

def check_store_fits(index: pipelines.StoreIndex, model_cfg, field: str, *, clip_fps: Optional[float] = None,
                     rate_field: str = "data.clip_fps") -> None:
    """The store of config field `field` (e.g. 'data.train_store', 'knn.eval_store') fits the
    model: the h x w grid; codes the embedding holds (from its tokenizer's vocabulary in the
    metadata); a frame rate that gives clips at `clip_fps` (config field `rate_field`) exactly: a
    whole multiple of it, so that a clip keeps every (store fps / clip fps)-th stored frame (the
    released `max(int(16 / frame_rate), 1)`, read from a 16-fps store; configs/finetune.py); and
    clips that are not all padding. Checked before anything compiles."""
    where = f"config.{field}={index.store_dir}"
    grid = (int(model_cfg["height"]), int(model_cfg["width"]))
    if tuple(index.grid) != grid:
        raise ValueError(f"{where}: tokens are {index.grid[0]}x{index.grid[1]} "
                         f"per frame, the model expects {grid[0]}x{grid[1]} (config.model.height/width)")
    codes = ((token_store.read_metadata(index.store_dir).get("tokenizer") or {}).get("config") or {}).get("vocab_size")
    if codes is not None and int(codes) > min(NUM_CODES, int(model_cfg["vocab_size"])):
        raise ValueError(f"{where}: its tokenizer has {int(codes)} codes, more than "
                         f"the model's {NUM_CODES} (ids from {NUM_CODES} on are the special ids; "
                         f"config.model.vocab_size={model_cfg['vocab_size']})")
    if clip_fps is not None and clip_fps <= 0:
        raise ValueError(f"config.{rate_field}={clip_fps} must be > 0 (or None: every stored frame)")
    for fps in (np.unique(index.fps) if clip_fps is not None else ()):
        ratio = float(fps) / float(clip_fps)
        if ratio < 1 - 1e-6 or abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(
                f"{where} holds frames at {float(fps):g} fps, which cannot give clips "
                f"at config.{rate_field}={float(clip_fps):g} (the store's fps must be a whole multiple of it): "
                f"tokenize the videos again at a multiple of it (`vimpac tokenize --fps 16`: the released rate of the "
                f"downstream sets, a multiple of the presets' 2 and 4 fps), or set config.{rate_field} to {float(fps):g} / n")
    clip_len = int(model_cfg["clip_len"])
    steps = np.array([pipelines.frame_step(f, clip_fps) for f in index.fps], np.int64)
    frames = -(-index.num_frames // steps[:, None])  # [V, C] frames at the clip rate
    if index.num_videos and frames.max() < clip_len:
        rate = "" if clip_fps is None else f" at config.{rate_field}={clip_fps}"
        raise ValueError(f"config.model.clip_len={clip_len} is longer than every video of {where}: "
                         f"the longest has {int(frames.max())} frames{rate}, so every clip "
                         f"would be mostly padding; lower config.model.clip_len (or config.{rate_field})")


def check_variant_set(index: pipelines.StoreIndex, variant_set: Optional[str], field: str = "train_store") -> None:
    """The training variants (after config.data.train_variants) must be of config.variant_set,
    the set `vimpac tokenize --variants` stores for the dataset (configs/finetune.py). A flipped
    clip where the set has none (SSV2: left/right is in its labels, Appendix C.1) is refused
    before compiling. Variants whose names do not follow `video_decode.Variant.name` are judged
    by the store's recorded `variant_set`."""
    if not variant_set:
        return
    from vimpac_jax.data import video_decode as vd

    if variant_set not in vd.VARIANT_SETS:
        raise ValueError(f"config.variant_set={variant_set!r} must be one of {sorted(vd.VARIANT_SETS)}")
    if True in vd.VARIANT_SETS[variant_set].flips:
        return
    if any(v.endswith(("_flip", "_noflip")) for v in index.variants):
        flipped = [v for v in index.variants if v.endswith("_flip")]
    else:
        stored_set = token_store.read_metadata(index.store_dir).get("variant_set")
        flips = stored_set in vd.VARIANT_SETS and True in vd.VARIANT_SETS[stored_set].flips
        flipped = list(index.variants) if flips else []
    if flipped:
        noflip = [v for v in index.variants if v not in flipped]
        select = f", or train on its unflipped ones with --config.data.train_variants={','.join(noflip)}" if noflip else ""
        raise ValueError(
            f"config.data.{field}={index.store_dir} holds flipped variants ({', '.join(flipped[:4])}"
            f"{', ...' if len(flipped) > 4 else ''}), but config.variant_set={variant_set!r} flips nothing (a mirror "
            f"changes this dataset's labels): tokenize it with `vimpac tokenize ... --variants {variant_set}`{select}")



class StoreTask:
    """Shared by pre-training and fine-tuning: a training store, a mesh, a TrainState."""

    name: str  # the task: "pretrain" | "finetune" (`pipelines.train_dataset`)
    loss_name = "loss"
    workdir = None  # set by the loop: where `init_from` is recorded

    def __init__(self, config, mesh, *, log):
        self.config, self.mesh, self.log = config, mesh, log
        self.model_cfg = config.model.to_dict()
        if not config.data.train_store:
            raise ValueError("config.data.train_store is required (a token store from `vimpac tokenize`)")
        self.index = pipelines.load_index(config.data.train_store)
        check_store_fits(self.index, self.model_cfg, "data.train_store", clip_fps=config.data.clip_fps)
        self.process_count = jax.process_count()
        global_batch = int(config.data.batch_size)
        shards = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
        if global_batch % self.process_count or global_batch % shards:
            raise ValueError(f"config.data.batch_size={global_batch} must divide over {self.process_count} "
                             f"processes and the {shards} data x fsdp devices")
        self.local_batch = global_batch // self.process_count
        steps_per_epoch = pipelines.steps_per_epoch(self.index, global_batch)
        if steps_per_epoch == 0:
            raise ValueError(f"config.data.batch_size={global_batch} is larger than the {self.index.num_videos} "
                             f"videos of {config.data.train_store}")
        self.total_steps = int(config.train.num_steps) or int(round(float(config.train.epochs) * steps_per_epoch))
        # Steps between periodic evaluations: train.eval_every, else train.eval_every_epochs (the
        # released --eval-per-epochs) in this store's steps; 0: at the end only.
        epochs = float(config.train.eval_every_epochs)
        self.eval_every = int(config.train.eval_every) or (max(1, int(round(epochs * steps_per_epoch))) if epochs else 0)
        self.schedule_steps = optimizer_lib.schedule_length(config.optim, steps_per_epoch, self.total_steps)
        self.optim_cfg = dict(config.optim.to_dict(), total_steps=self.schedule_steps)
        # Once per run (it traces the model's initialisation): the layout of the state for its
        # initialisation, every step and evaluation, and the restore of a checkpoint.
        self.state_shardings = train_state_shardings(self.model_cfg, self.optim_cfg, mesh)

    def init_state(self, key) -> TrainState:
        state = init_train_state(self.model_cfg, self.optim_cfg, key, self.mesh, state_shardings=self.state_shardings)
        record = None
        if self.config.init_from:
            state, record = initialise_from(state, self.config.init_from,
                                            allow_mismatch=bool(self.config.init_from_allow_mismatch),
                                            with_optimizer=bool(self.config.init_from_optimizer), log=self.log)
        self.check_schedule(state)
        if record is not None and self.workdir is not None:
            workdir_lib.record_init_source(self.workdir, record)
        return state

    def check_schedule(self, state: TrainState) -> None:
        """The run must fit in what is left of its schedule. A state from `init_from_optimizer`
        continues the schedule at the source's update count (the released `--resume` restores
        the LambdaLR with the optimizer), so a stage-2 run of 10 epochs after 90 needs the same
        100-epoch schedule (`config.optim.schedule_epochs`), not a 10-epoch one it starts past."""
        start = int(jax.device_get(optimizer_lib.schedule_count(state.opt_state)))
        end = start + self.total_steps
        if start:
            lr = float(jax.device_get(optimizer_lib.applied_learning_rate(
                optimizer_lib.make_schedule(self.optim_cfg), state.opt_state)))
            self.log(f"schedule: continuing at update {start} of {self.schedule_steps} "
                     f"(learning rate {lr:.3g}) from {self.config.init_from}")
        if end > self.schedule_steps and self.config.optim.schedule != "constant":
            raise ValueError(
                f"this run makes updates [{start}, {end}) of a {self.schedule_steps}-update learning-rate schedule, "
                f"whose rate is 0 after its end: set config.optim.schedule_epochs (or schedule_steps) to the whole "
                f"schedule's length (e.g. 100 epochs for the released two-stage recipe), or shorten "
                f"config.train.epochs/num_steps")

    def global_batch(self, local: dict) -> dict:
        return shd.make_global_batch(local, self.mesh)

    def evaluation_due(self, step: int) -> bool:
        return bool(self.eval_every) and step % self.eval_every == 0

    def dataset(self):
        c = self.config
        return pipelines.train_dataset(
            self.index, self.name, batch_size=self.local_batch, clip_len=self.model_cfg["clip_len"], seed=int(c.seed),
            clip_fps=c.data.clip_fps, variants=split_variants(c.data.train_variants),
            relevance_range=c.data.relevance_range if self.name == "pretrain" else None)

    def iterator(self):
        return pipelines.make_iterator(self.dataset(), workers=int(self.config.data.workers))
