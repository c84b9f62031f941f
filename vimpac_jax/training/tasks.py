"""What differs between the training tasks: data, state, step. The loop (`train.py`) is shared.

A task is built from the config and the mesh and exposes:
  total_steps, items_per_step                  updates of this run (the loop's length)
  schedule_steps                               length of the learning-rate schedule (>= the run)
  init_state(key) -> state (sharded)          fresh parameters, or `config.init_from`
  iterator() -> checkpointable grain iterator  this process's share of the training data
  global_batch(local) -> dict of global arrays
  step(state, batch, key) -> (state, metrics)  jitted; metrics are replicated scalars
  loss_name                                    the metric shown in the progress line
  evaluation_due(step) -> bool                 whether `evaluate(state, step=step)` has work at this step
  evaluate(state, step=, full=) -> dict        periodic (what is due at `step`) or final (`full`: all)
                                               evaluation; scalars (may be empty)
"""

import logging
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from vimpac_jax import checkpoints
from vimpac_jax.constants import MASK_ID, NUM_CODES, VOCAB_SIZE
from vimpac_jax.data import pipelines, token_store
from vimpac_jax.training import checkpointing
from vimpac_jax.training import init_from as init_from_lib
from vimpac_jax.training import optimizer as optimizer_lib
from vimpac_jax.training import sharding as shd
from vimpac_jax.training import workdir as workdir_lib
from vimpac_jax.training.finetune_step import accuracy_report, make_eval_step, make_finetune_step, view_cross_entropy
from vimpac_jax.training.pretrain_step import (TrainState, init_train_state, make_pretrain_eval_step, make_pretrain_step,
                                              train_state_shardings)


def _variants(value: Optional[str]) -> Optional[list[str]]:
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


def load_init_source(path: str, log=checkpointing.log_to_stderr) -> tuple[dict, dict, dict]:
    """(model config, {'params', 'batch_stats'[, 'opt_state']}, record) of a model checkpoint or
    of the newest intact checkpoint of a training workdir (which also has the optimizer state).
    record: {'init_from': path, 'step': the workdir checkpoint's step (None for a model
    checkpoint), 'skipped': the warnings about newer steps that could not be restored}."""
    p = Path(path)
    record = {"init_from": str(path), "step": None, "skipped": []}
    if checkpoints.is_model_checkpoint(p):
        return (*checkpoints.load_model(p), record)
    if workdir_lib.is_workdir(p):
        def warn(message: str) -> None:
            record["skipped"].append(message)
            log(message)

        try:
            step, restored = workdir_lib.restore_variables(p, ("params", "batch_stats", "opt_state"), log=warn)
        except workdir_lib.WorkdirError as e:
            raise ValueError(f"config.init_from={path}: {e}") from None
        record["step"] = int(step)
        return workdir_lib.read_model_config(p), {"params": restored["params"],
                                                   "batch_stats": restored.get("batch_stats", {}),
                                                   "opt_state": restored.get("opt_state")}, record
    raise FileNotFoundError(f"config.init_from={path}: not a model checkpoint (model_config.json) nor a training "
                            f"workdir ({workdir_lib.CONFIG_FILE} + {workdir_lib.CHECKPOINTS_DIR}/)")


def init_source_line(record: dict) -> str:
    """The log line naming what a run was initialised from (the step, and whether newer ones
    were skipped as damaged)."""
    if record["step"] is None:
        return f"init_from: {record['init_from']} (a model checkpoint)"
    skipped = (f"; {len(record['skipped'])} newer checkpoint(s) could not be restored (warned above), so not its "
               f"newest" if record["skipped"] else " (its newest intact checkpoint)")
    return f"init_from: {record['init_from']} at step {record['step']}{skipped}"


def initialise_from(state: TrainState, path: str, *, allow_mismatch: bool, with_optimizer: bool,
                    log) -> tuple[TrainState, dict]:
    """Overwrite the state's parameters and BatchNorm statistics (and, `with_optimizer`, the Adam
    moments: the second pre-training stage) from `path`, interpolating positional tables.
    Returns the state and `load_init_source`'s record of what was read."""
    _, source, record = load_init_source(path)
    log(init_source_line(record))
    target = {"params": state.params, "batch_stats": state.batch_stats}
    src = {"params": source["params"], "batch_stats": source.get("batch_stats") or {}}
    if with_optimizer:
        if source.get("opt_state") is None:
            raise ValueError(f"config.init_from_optimizer: {path} holds no optimizer state (use a training workdir)")
        target["opt_state"], src["opt_state"] = state.opt_state, source["opt_state"]
    expected = tuple(f"/{head}/" for head in init_from_lib.TASK_HEADS)  # heads that differ by task
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    values, report = init_from_lib.adapt_tree(abstract, src, expected_missing=expected, expected_unused=expected,
                                              allow_mismatch=allow_mismatch)
    log(init_from_lib.format_report(report))
    logging.getLogger(__name__).debug("init_from: every leaf not restored as is:\n%s", init_from_lib.report_details(report))
    filled = jax.tree.map(lambda v, old: v if isinstance(v, np.ndarray) else old, values, target)
    placed = jax.tree.map(lambda v, old: jax.device_put(np.asarray(v, old.dtype), old.sharding), filled, target)
    return state.replace(**placed), record


class _StoreTask:
    """Shared by pre-training and fine-tuning: a training store, a mesh, a TrainState."""

    name: str  # the task: "pretrain" | "finetune" (`pipelines.train_dataset`)
    loss_name = "loss"

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
        epochs = float(config.train.get("eval_every_epochs", 0.0))
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
        if record is not None and getattr(self, "workdir", None) is not None:
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
            clip_fps=c.data.clip_fps, variants=_variants(c.data.train_variants),
            relevance_range=c.data.relevance_range if self.name == "pretrain" else None)

    def iterator(self):
        return pipelines.make_iterator(self.dataset(), workers=int(self.config.data.workers))


def store_code_range(store: str) -> tuple[int, int, str]:
    """(lowest, highest) code a token store can hold and where that was read: the vocabulary of
    the tokenizer named in its metadata, or else (a store from elsewhere) every stored token."""
    tokenizer = token_store.read_metadata(store).get("tokenizer") or {}
    vocab = (tokenizer.get("config") or {}).get("vocab_size")
    if vocab is not None:
        return 0, int(vocab) - 1, f"its tokenizer's {int(vocab)} codes"
    source = token_store.open_records(store)
    lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for i in range(len(source)):
        tokens = token_store.decode_record(source[i])["tokens"]
        if tokens.size:
            lo, hi = min(lo, int(tokens.min())), max(hi, int(tokens.max()))
    return lo, hi, "its stored tokens"


def _check_mlm_codes(model_cfg: dict, store: str, field: str = "train_store") -> None:
    """model.mlm_codes must cover every code of the store (they are the MLM targets): a larger
    code is a target the head cannot score, a NaN loss, so it is refused before compiling."""
    codes = model_cfg.get("mlm_codes")
    if codes is None or not store:
        return
    lo, hi, source = store_code_range(store)
    if hi >= int(codes) or lo < 0:
        raise ValueError(f"config.model.mlm_codes={codes} scores ids [0, {codes}) only, but config.data.{field}={store} "
                         f"holds codes {lo}..{hi} ({source}); set config.model.mlm_codes >= {hi + 1} (or None for all ids)")


class PretrainTask(_StoreTask):
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
            from vimpac_jax.training.knn import KnnMonitor

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


class FinetuneTask(_StoreTask):
    name = "finetune"

    def __init__(self, config, mesh, *, log):
        super().__init__(config, mesh, log=log)
        self.items_per_step = int(config.data.batch_size)
        micro_batches = int(config.finetune.micro_batches)
        shards = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
        per_device = int(config.finetune.get("videos_per_device", 0))
        if per_device:  # the released --bs-per-gpu: gradient_accumulation = batch / devices / bs_per_gpu
            if int(config.data.batch_size) % (per_device * shards):
                raise ValueError(f"config.finetune.videos_per_device={per_device} on {shards} data x fsdp devices "
                                 f"does not divide config.data.batch_size={config.data.batch_size}")
            micro_batches = int(config.data.batch_size) // (per_device * shards)
            log(f"fine-tuning: {config.data.batch_size}-video updates in {micro_batches} micro-batch(es) of "
                f"{per_device} video(s) per device (config.finetune.videos_per_device)")
        self.micro_batches = micro_batches
        if micro_batches < 1 or int(config.data.batch_size) % (micro_batches * shards):
            raise ValueError(f"config.finetune.micro_batches={micro_batches} must be >= 1 and split "
                             f"config.data.batch_size={config.data.batch_size} into micro-batches that divide over "
                             f"the {shards} data x fsdp devices")
        check_variant_set(self.index.select_variants(_variants(config.data.train_variants)),
                          config.get("variant_set"))
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


def class_names_of(config) -> Optional[list[str]]:
    """What a fine-tuning run's labels mean: config.class_names, else the names its training (or
    held-out) store recorded (`vimpac tokenize`: a directory's class folders, a TFDS dataset's
    label names, --class-names); None when neither says (or the stores are gone)."""
    names = config.get("class_names", None)
    if names:
        return list(names)
    data = config.get("data", None) or {}  # a workdir's config.json written by hand may hold only `model`
    for store in (data.get("train_store"), data.get("eval_store")):
        try:
            recorded = token_store.read_metadata(store).get("class_names") if store else None
        except (OSError, ValueError):
            continue
        if recorded:
            return list(recorded)
    return None
def validation_batch_size(config, shards: int) -> int:
    """Videos per held-out validation batch of pre-training: config.pretrain.eval_batch_size, else
    1.5x the micro-batch (the released `bs_per_gpu * 1.5`), rounded up to whole batches over
    `shards` (the data x fsdp devices times the processes)."""
    size = int(config.pretrain.eval_batch_size) or int(
        1.5 * int(config.data.batch_size) // int(config.pretrain.micro_batches))
    return -(-size // shards) * shards


def multiview_batch_size(config, shards: int) -> int:
    """Videos per batch of the multi-view test: config.data.eval_batch_size rounded up to whole
    batches over `shards` (the data x fsdp devices times the processes)."""
    return -(-int(config.data.eval_batch_size) // shards) * shards


def eval_variant_names(index: pipelines.StoreIndex, crops: Optional[str], explicit: Optional[str]) -> list[str]:
    """The stored variants used as test crops: explicit names, or the no-flip crops at the
    smallest resize (3 crops); `crops='center'` (or 1) keeps the center crop only (SSV2)."""
    return eval_crop_names(index.variants, crops, explicit)


def eval_crop_names(stored, crops: Optional[str], explicit: Optional[str]) -> list[str]:
    """`eval_variant_names` from the stored variant names (a store's metadata, for `vimpac predict`)."""
    if explicit:
        return _variants(explicit)
    names = list(pipelines.default_test_variants(stored))
    if str(crops) in ("center", "1"):
        center = [n for n in names if "center" in n]
        names = center[:1] or names[:1]
    return names


def eval_crops_of(config, crops: Optional[str] = None) -> str:
    """The multi-view test's crops: `crops` when given, else the run's `eval_crops` (the fine-tuning
    presets set it, configs/finetune.py), else the released test's three crops."""
    return crops or config.get("eval_crops", None) or "three"


def multiview_protocol(config, index: pipelines.StoreIndex, num_clips: Optional[int] = None,
                       crops: Optional[str] = None) -> tuple[int, list[str]]:
    """(K clips per crop, the crop variants' names) of the multi-view test: the arguments, or the
    run's `data.eval_clips` and `eval_crops`."""
    return (int(num_clips or config.data.eval_clips),
            eval_variant_names(index, eval_crops_of(config, crops), config.data.eval_variants))


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


TASKS = {"pretrain": PretrainTask, "finetune": FinetuneTask}
