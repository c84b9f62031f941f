"""Pieces shared by the config files (big_vision style: plain functions returning ConfigDicts).

Every training config has the blocks: task, seed, model, optim, mesh, data, train, and the
task's own block (pretrain / finetune). `vimpac train` rejects unknown fields (configs are
locked) and bad values before anything compiles.
"""

import ml_collections

from vimpac_jax.models import config as models_config
from vimpac_jax.training.optimizer import optim_config
from vimpac_jax.training.pretrain_step import pretrain_config
from vimpac_jax.training.sharding import mesh_config

def model_config(preset: str, *, task: str = "pretrain", clip_len: int = 5, frame_size: int = 128,
                 num_classes: int = 0) -> ml_collections.ConfigDict:
    """The `config.model` block: a size of `vimpac_jax.models.config.MODEL_PRESETS` (the paper's
    Table 3, and `tiny`) at CLIP_LEN frames of FRAME_SIZE px (tokens of 8x8 px)."""
    return models_config.model_config(preset, task=task, clip_len=clip_len, height=frame_size // 8,
                                      width=frame_size // 8, num_classes=num_classes)


def data_config(**overrides) -> ml_collections.ConfigDict:
    """`config.data`: token stores and sampling (see vimpac_jax/data/pipelines.py)."""
    d = ml_collections.ConfigDict(dict(
        train_store="",              # a token store written by `vimpac tokenize`
        eval_store="",               # held-out split (pre-training: validation; fine-tuning: the test); '' = none
        batch_size=1024,             # global batch, in videos, of one optimizer update
        clip_fps=ml_collections.FieldReference(None, field_type=float),  # None = stored fps
        relevance_range=ml_collections.FieldReference(None, field_type=int),  # pre-training
        train_variants=ml_collections.FieldReference(None, field_type=str),  # comma list; None = all
        eval_variants=ml_collections.FieldReference(None, field_type=str),   # None = no-flip crops
        eval_clips=10,               # K uniformly spaced test clips per crop
        eval_batch_size=16,          # videos per evaluation batch (x clips x crops views)
        workers=0,                   # grain worker processes
    ))
    d.update(overrides)
    return d


def train_config(**overrides) -> ml_collections.ConfigDict:
    """`config.train`: length, logging, checkpoints, evaluation."""
    t = ml_collections.ConfigDict(dict(
        epochs=10.0,
        num_steps=0,                 # > 0 overrides epochs
        log_every=50,
        checkpoint_every=1000,
        keep_checkpoints=3,
        eval_every=0,                # steps; 0 = every eval_every_epochs, else at the end only
        eval_every_epochs=0.0,       # epochs between evaluations when eval_every is 0 (the released
                                     # --eval-per-epochs); 0 = at the end only
        progress_seconds=10.0,
        # A jax.profiler trace by process 0 of profile_steps steps from step profile_first_step,
        # under WORKDIR/tensorboard (training/profiling.py); profile_steps=0: none.
        profile_first_step=10,
        profile_steps=0,
    ))
    t.update(overrides)
    return t


def base_config(task: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = task
    config.seed = 0
    config.mesh = mesh_config()
    config.optim = optim_config()
    config.data = data_config()
    config.train = train_config()
    config.init_from = ""                  # checkpoint dir or workdir to start from
    config.init_from_allow_mismatch = False
    config.init_from_optimizer = False     # also take the Adam moments (two-stage pre-training)
    # The fine-tuning run's test and data (configs/finetune.py sets them per dataset; pre-training
    # reads none of them): variant_set, the variants `vimpac tokenize --variants` must have stored
    # (None: any; tasks/store_task.check_variant_set); eval_crops, the multi-view test's crops
    # ('three', the released test's, or 'center', SSV2's: tasks/multiview.py); class_names, what
    # the labels mean (empty: the names the run's stores recorded, if any).
    config.variant_set = ml_collections.FieldReference(None, field_type=str)
    config.eval_crops = "three"
    config.class_names = ()
    config.pretrain = pretrain_config()
    # micro_batches: gradient accumulation (the released --gradient_accumulation): an update of
    # data.batch_size videos from that many forward/backward passes. videos_per_device > 0 sets it
    # from the device count instead, as the released --bs-per-gpu does (gradient_accumulation =
    # batch / devices / bs_per_gpu): micro-batches of that many videos per data x fsdp device.
    config.finetune = ml_collections.ConfigDict(dict(label_smoothing=0.0, micro_batches=1, videos_per_device=0))
    # The released kNN monitor (vimpac/knn_monitor.py): k = 200, temperature 0.07; labelled stores
    # (UCF101 train / val). every: steps between kNN evaluations; 0 = with every evaluation
    # (train.eval_every) and at the end. clip_fps: the clips' frame rate, 2 fps as the released
    # monitor (the 2-fps LMDBs), from stores at any whole multiple of it; None: every stored frame.
    config.knn = ml_collections.ConfigDict(dict(train_store="", eval_store="", k=200, temperature=0.07,
                                                every=0, batch_size=32,
                                                clip_fps=ml_collections.FieldReference(2.0, field_type=float)))
    return config


def tokenizer_config() -> ml_collections.ConfigDict:
    """Every block of the VQ tokenizer's task (configs/tokenizer.py) at its defaults. The size
    (model.codebook_size, embedding_dim, widths, n_blk_per_group) and the length (train.num_steps)
    have none (0, ()): a preset or the config file gives them."""
    config = ml_collections.ConfigDict()
    config.task = "tokenizer"
    config.preset = ""
    config.seed = 0
    # Data parallel only: the tokenizer's parameters are replicated (see optim.flatten_optimizer).
    config.mesh = mesh_config()
    # The model block: vimpac_jax.tokenizer.vq.MODEL_FIELDS, plus the kind and compute dtype.
    config.model = ml_collections.ConfigDict(dict(kind="vq", channels=3, dtype="float32", codebook_size=0,
                                                  embedding_dim=0, widths=(), n_blk_per_group=0))
    # Adam (b2 = 0.99, as common for VQ-VAEs) after global-norm clipping; the learning rate warms
    # up over `warmup` updates (< 1: a fraction of train.num_steps, as in optim_config), then
    # decays to 0 on a cosine (vimpac_jax.tokenizer.vq_train.make_schedule).
    config.optim = ml_collections.ConfigDict(dict(
        learning_rate=3e-4, warmup=0.0, b1=0.9, b2=0.99,
        clip_grad_norm=1.0,      # 0 disables it
        flatten_optimizer=True,  # Adam on one raveled vector: fast to compile; replicated params
    ))
    config.data = ml_collections.ConfigDict(dict(
        videos="",                # list file / directory / glob; required
        batch_size=64,            # global batch, in frames, of one update
        fps=2.0,                  # frames sampled per second of video
        size=128,                 # square frame side (a multiple of 8)
        max_frames_per_video=64,  # cap per file, so long videos do not dominate the pool
        max_pool_gib=8.0,         # refuse to cache more decoded frames in memory than this
        workers=4,                # decoding processes (0: decode in this process)
        flip=True,                # random horizontal flips
    ))
    config.train = train_config(num_steps=0, log_every=50, checkpoint_every=1_000)
    del config.train.epochs       # frames have no epochs here: train.num_steps is the length
    # The task's own block: the VQ objective (vimpac_jax.tokenizer.vq_train.VQHParams).
    config.tokenizer = ml_collections.ConfigDict(dict(
        commitment_beta=0.25,   # van den Oord et al.'s beta
        ema_decay=0.99,         # codebook EMA decay
        epsilon=1e-5,           # Laplace smoothing of the EMA counts
        restart_threshold=1.0,  # restart codes used by < 1 vector per batch (EMA); <= 0 disables
    ))
    return config


def runlocal(config: ml_collections.ConfigDict) -> None:
    """Shrinks a preset to run on one CPU in seconds: tiny model, tiny batches, few steps.

    The model is the tiny preset at one layer: a run that checks a set-up end to end needs every
    part of the model once, not its depth, and each layer adds to tracing and compiling (the
    second layer: ~1.4 s of CPU of a 10-step `vimpac train`, ~3.5 s when it compiles cold)."""
    task, clip_len = config.model.task, min(config.model.clip_len, 3)
    num_classes = config.model.num_classes
    config.model = model_config("tiny", task=task, clip_len=clip_len, frame_size=32, num_classes=num_classes)
    config.model.num_layers = 1
    config.data.batch_size = 4
    config.data.eval_batch_size = 4
    config.data.eval_clips = 2
    config.train.num_steps = 10
    config.train.log_every = 2
    config.train.checkpoint_every = 5
    config.pretrain.mask_blocks = 2
    config.knn.batch_size = 4
