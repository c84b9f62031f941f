"""Every field of a run config with its type and range: a config is resolved once, when it is loaded.

`resolve(config)` runs in `config_utils.load_config` (so in `vimpac train`, `vimpac sweep`,
`vimpac params`, the demo) and at the start of `training.train.train` (a config built in Python),
before a data index is read, anything is allocated, written or compiled. It completes the config
(`complete`: the fields a config lacks, at their blocks' defaults: `configs/common.py`
`base_config` and `models/config.py` `model_config` for pre-training and fine-tuning,
`configs/common.py` `tokenizer_config` for the tokenizer, the one definition of each), so the
library reads plain fields, then checks it (`check`): one ValueError that
names every field out of its type or range (`config.optim.learning_rate=-1.0 must be > 0`),
every field no block has (with the nearest valid name, as ml_collections does for a misspelt
`--config.FIELD=` override; a config *file* can add fields that nothing would read), and the
cross-field rules a single range cannot state (heads that divide the width, block masks that a
clip can hold, warm-up within the run, ...).

The tables are per task and per block (`SCHEMAS`): one `Field` per field, in the order of the
block's definition (the model block: `models/config.py`; optim: `training/optimizer.py`;
pretrain: `training/pretrain_step.py`; mesh: `training/sharding.py`; data, train, finetune, knn:
`configs/common.py`; the tokenizer's blocks: `configs/common.py` `tokenizer_config`). A new
field is one line in its block's table here, next to its default there.

Import direction: the schema sits above the modules whose fields it states (`models/`, `data/`,
`configs/common.py`, `training/`'s optimizer, steps and sharding: it imports their choice sets,
parsers and defaults, inside the functions that need them, so importing it stays cheap) and below
what reads or builds a config (`config_utils`, `training/train.py`'s `train`, `aot/compile.py`,
benchmarks that assemble blocks: `check_block`). No module it imports imports it back: a library
function is handed checked blocks and never calls the schema (docs/architecture.md, "Import
direction").
"""

import dataclasses
import difflib
import math
from typing import Any, Callable, Mapping, Optional

_NUMBER = (int, float)


@dataclasses.dataclass(frozen=True)
class Field:
    """A config field: its type, an optional range (closed unless `open_low`/`open_high`), a
    set of `choices`, `optional`: None allowed (a FieldReference(None) in the block)."""

    kind: type | tuple[type, ...]
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False
    choices: Optional[tuple] = None
    optional: bool = False
    note: str = ""  # what a value means, for the message (e.g. "0: from train.epochs")

    def problem(self, value: Any) -> Optional[str]:
        """What `value` should have been ('must be ...'), or None when it is fine."""
        if value is None:
            return None if self.optional else f"must be {self._expected(kind=True)}"
        if isinstance(value, bool) != (self.kind is bool) or not isinstance(value, self.kind):
            return f"must be {self._expected(kind=True)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number {self._expected()}".rstrip()
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(repr, self.choices))}"
        if (self.low is not None and (value < self.low or (self.open_low and value == self.low))) or \
                (self.high is not None and (value > self.high or (self.open_high and value == self.high))):
            return f"must be {self._expected()}"
        return None

    def _expected(self, kind: bool = False) -> str:
        """The range ('>= 1 (0: ...)', 'in [0, 1)'); with `kind`, the type first ('an integer >= 1')."""
        def num(x):
            return f"{x:g}" if isinstance(x, float) else str(x)

        parts = []
        if kind:
            kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
            words = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                     list: "a list", tuple: "a list"}
            parts.append("a number" if self.kind == _NUMBER else
                         " or ".join(dict.fromkeys(words.get(k, k.__name__) for k in kinds)))
        if self.low is not None and self.high is not None:
            parts.append(f"in {'(' if self.open_low else '['}{num(self.low)}, {num(self.high)}"
                         f"{')' if self.open_high else ']'}")
        elif self.low is not None:
            parts.append(f"{'>' if self.open_low else '>='} {num(self.low)}")
        elif self.high is not None:
            parts.append(f"{'<' if self.open_high else '<='} {num(self.high)}")
        if kind and self.optional:
            parts.append("or None")
        if self.note:
            parts.append(f"({self.note})")
        return " ".join(parts)


def Int(low=None, high=None, **kw) -> Field:  # noqa: N802 (a field's type, as in a table)
    return Field(int, low, high, **kw)


def Float(low=None, high=None, **kw) -> Field:  # noqa: N802
    return Field(_NUMBER, low, high, **kw)


def Str(choices=None, **kw) -> Field:  # noqa: N802
    return Field(str, choices=tuple(choices) if choices is not None else None, **kw)


def Bool() -> Field:  # noqa: N802
    return Field(bool)


def Probability(**kw) -> Field:  # noqa: N802
    """A probability of dropping (dropout): 1 would drop everything."""
    return Float(0.0, 1.0, open_high=True, **kw)


SEED = Int(0, 2**32 - 1, note="jax.random.key folds larger seeds onto these")


# ----------------------------------------------------------------------------------------------
# The blocks of pre-training and fine-tuning (configs/common.py `base_config`).

def _model_fields() -> dict[str, Field]:
    """`config.model` (models/config.py `model_config`)."""
    from vimpac_jax.constants import MASK_ID, NUM_CODES, VOCAB_SIZE
    from vimpac_jax.models.attention import ATTENTION_KERNELS
    from vimpac_jax.models.backbone import EMBED_LOOKUPS, POS_EMB_KINDS
    from vimpac_jax.models.model import DTYPES

    return dict(
        task=Str(("pretrain", "finetune")),
        num_layers=Int(1), hidden_dim=Int(1),
        clip_len=Int(1), height=Int(1), width=Int(1),
        layout=Str(), num_heads=Int(1, optional=True, note="None: hidden_dim // 64"),
        pos_emb=Str(POS_EMB_KINDS), pre_ln=Bool(), halve_att=Bool(), halve_mlp=Bool(),
        dropout=Probability(), attention_dropout=Probability(),
        # The special ids (PAD, MASK, ...) follow the codes: the table must hold them.
        vocab_size=Int(VOCAB_SIZE, note=f"{NUM_CODES} codes, then the special ids up to MASK_ID={MASK_ID}"),
        dtype=Str(sorted(DTYPES)),
        remat=Str(),  # checked by backbone.remat_policy (`save:<names>` is open-ended), below
        embed_lookup=Str(EMBED_LOOKUPS),
        scan_layers=Bool(),
        attention_impl=Str(optional=True),
        attention_kernel=Str(ATTENTION_KERNELS),
        proj_layers=Int(1), proj_hidden_dim=Int(1), proj_dim=Int(1),
        mlm_codes=Int(1, optional=True, note="None: every id of vocab_size"),
        num_classes=Int(0), last_dropout=Probability(),
    )


def _optim_fields() -> dict[str, Field]:
    """`config.optim` (training/optimizer.py `optim_config`)."""
    from vimpac_jax.training.optimizer import SCHEDULES

    return dict(
        learning_rate=Float(0.0, open_low=True),
        schedule=Str(SCHEDULES),
        # The released `--warm-up` ratio (paper Table 4: 5%, 10%); a fraction, so that 2.0 (200%
        # of the run, or 2 updates?) cannot be read two ways.
        warmup=Float(0.0, 1.0, open_high=True, note="a fraction of the schedule's updates"),
        total_steps=Int(1),
        schedule_steps=Int(0, note="0: from schedule_epochs or the run"),
        schedule_epochs=Float(0.0, open_low=True, optional=True, note="None: as long as the run"),
        b1=Float(0.0, 1.0, open_high=True), b2=Float(0.0, 1.0, open_high=True), eps=Float(0.0, open_low=True),
        weight_decay=Float(0.0),
        clip_grad_norm=Float(0.0, note="0 disables clipping"),
        match_released_decay=Bool(),
    )


def _pretrain_fields() -> dict[str, Field]:
    """`config.pretrain` (training/pretrain_step.py `pretrain_config`)."""
    from vimpac_jax.training.pretrain_step import DROPOUT_RNGS, MLM_POSITIONS

    return dict(
        mlm_weight=Float(0.0), nce_weight=Float(0.0),
        mask_kind=Str(("block", "iid")),
        mask_blocks=Int(1, note="at most the clip's tokens, below"),
        mask_prob=Float(0.0, 1.0),
        mask_noise=Str(("none", "bert")),
        max_masked=Int(0, note="0: from the quantile"),
        max_masked_quantile=Float(0.0, 1.0, open_low=True),
        mlm_positions=Str(MLM_POSITIONS),
        packed_quantile=Float(0.0, 1.0, open_low=True),
        mlm_vocab_multiple=Int(1),
        dropout_rng=Str(DROPOUT_RNGS),
        micro_batches=Int(1),
        eval_batch_size=Int(0, note="0: 1.5x the micro-batch"),
        eval_clip_fps=Float(0.0, open_low=True, optional=True, note="None: every stored frame"),
    )


def _mesh_fields() -> dict[str, Field]:
    """`config.mesh` (training/sharding.py `mesh_config`); the rules are checked by
    `sharding.logical_axis_rules`, below."""
    return dict(data=Int(-1, note="-1: the devices left"), fsdp=Int(-1), tensor=Int(-1),
                logical_axis_rules=Field((list, tuple)))


DATA_FIELDS = dict(  # configs/common.py `data_config`
    train_store=Str(), eval_store=Str(),
    batch_size=Int(1),
    clip_fps=Float(0.0, open_low=True, optional=True, note="None: every stored frame"),
    relevance_range=Int(0, optional=True),
    train_variants=Str(optional=True), eval_variants=Str(optional=True),
    eval_clips=Int(1), eval_batch_size=Int(1),
    workers=Int(0, note="0: in this process"),
)

TRAIN_FIELDS = dict(  # configs/common.py `train_config`: the loop's own fields, every task
    epochs=Float(0.0, note="> 0 unless train.num_steps is set, below"),
    num_steps=Int(0, note="0: from train.epochs"),
    log_every=Int(1), checkpoint_every=Int(1), keep_checkpoints=Int(1),
    eval_every=Int(0, note="0: every train.eval_every_epochs, else at the end only"),
    eval_every_epochs=Float(0.0, note="0: at the end only"),
    progress_seconds=Float(0.0),
    # The profiler window (training/profiling.py): steps [first, first + steps) by process 0.
    profile_first_step=Int(1, note="steps count from 1"), profile_steps=Int(0, note="0: no profile"),
)

FINETUNE_FIELDS = dict(label_smoothing=Float(0.0, 1.0, open_high=True), micro_batches=Int(1),
                       videos_per_device=Int(0, note="0: finetune.micro_batches"))

KNN_FIELDS = dict(train_store=Str(), eval_store=Str(), k=Int(1), temperature=Float(0.0, open_low=True),
                  every=Int(0, note="0: with every evaluation"), batch_size=Int(1),
                  clip_fps=Float(0.0, open_low=True, optional=True, note="None: every stored frame"))


def _store_task_schema() -> dict[str, Any]:
    """The fields of a pre-training or fine-tuning config: top-level fields, and blocks (dicts)."""
    from vimpac_jax.data.video_decode import VARIANT_SETS

    return dict(
        task=Str(("pretrain", "finetune")), seed=SEED,
        mesh=_mesh_fields(), optim=_optim_fields(), data=DATA_FIELDS, train=TRAIN_FIELDS,
        init_from=Str(), init_from_allow_mismatch=Bool(), init_from_optimizer=Bool(),
        pretrain=_pretrain_fields(), finetune=FINETUNE_FIELDS, knn=KNN_FIELDS, model=_model_fields(),
        # Fine-tuning (configs/finetune.py, configs/demo.py): the dataset, its split, the variants
        # its store must hold, the test's crops and (demo) the class names. The last three have
        # their defaults in configs/common.py `base_config`; dataset and split, which no code
        # reads (they name the preset), have none.
        dataset=Str(), split=Int(1), variant_set=Str(sorted(VARIANT_SETS), optional=True),
        eval_crops=Str(("three", "center")), class_names=Field((list, tuple)),
    )


def _tokenizer_schema() -> dict[str, Any]:
    """The VQ tokenizer's task (configs/tokenizer.py)."""
    return dict(
        task=Str(("tokenizer",)), preset=Str(), seed=SEED, mesh=_mesh_fields(),
        model=dict(kind=Str(("vq",)), channels=Int(1), dtype=Str(("float32", "bfloat16", "float16")),
                   codebook_size=Int(2), embedding_dim=Int(1), widths=Field((list, tuple)), n_blk_per_group=Int(1)),
        # warmup: updates, or (< 1) a fraction of train.num_steps (at most train.num_steps, below).
        optim=dict(learning_rate=Float(0.0, open_low=True), warmup=Float(0.0), b1=Float(0.0, 1.0, open_high=True),
                   b2=Float(0.0, 1.0, open_high=True), clip_grad_norm=Float(0.0, note="0 disables clipping"),
                   flatten_optimizer=Bool()),
        data=dict(videos=Str(), batch_size=Int(1), fps=Float(0.0, open_low=True), size=Int(8, note="a multiple of 8"),
                  max_frames_per_video=Int(1), max_pool_gib=Float(0.0, open_low=True), workers=Int(0), flip=Bool()),
        train={k: v for k, v in TRAIN_FIELDS.items() if k != "epochs"},
        tokenizer=dict(commitment_beta=Float(0.0), ema_decay=Float(0.0, 1.0, open_high=True),
                       epsilon=Float(0.0, open_low=True), restart_threshold=Float(note="<= 0 disables restarts")),
    )


SCHEMAS: dict[str, Callable[[], dict[str, Any]]] = {
    "pretrain": _store_task_schema, "finetune": _store_task_schema, "tokenizer": _tokenizer_schema}


# ----------------------------------------------------------------------------------------------
# Cross-field rules: what one field's range cannot say.

def _model_rules(config, need) -> None:
    from vimpac_jax.models.backbone import remat_policy
    from vimpac_jax.models.layout import parse_layout

    m = config.get("model") or {}
    for name, parse in (("layout", parse_layout), ("remat", remat_policy)):
        if isinstance(m.get(name), str):
            try:
                parse(m[name])
            except ValueError as e:
                need(False, f"model.{name}", m[name], f"valid ({e})")
    d, heads = m.get("hidden_dim"), m.get("num_heads")
    if isinstance(d, int) and d >= 1 and (heads is None or isinstance(heads, int) and heads >= 1):
        heads = heads or d // 64  # backbone.VideoTransformer: hidden_dim // 64 heads by default
        halve = " x 2 (halve_att: attention over hidden_dim // 2)" if m.get("halve_att") else ""
        if heads < 1:
            need(False, "model.hidden_dim", d, ">= 64 (one head of 64 when model.num_heads is None), or set "
                 "model.num_heads")
        else:
            need((d // 2 if halve else d) % heads == 0, "model.hidden_dim", d,
                 f"a multiple of the heads ({heads}: model.num_heads, or hidden_dim // 64 when None){halve}")
    if isinstance(m.get("mlm_codes"), int) and isinstance(m.get("vocab_size"), int):
        need(m["mlm_codes"] <= m["vocab_size"], "model.mlm_codes", m["mlm_codes"],
             f"<= model.vocab_size={m['vocab_size']}")
    if config.get("task") == "finetune" and isinstance(m.get("num_classes"), int):
        need(m["num_classes"] >= 1, "model.num_classes", m["num_classes"], ">= 1 (a classifier)")
    if isinstance(m.get("task"), str) and isinstance(config.get("task"), str):
        need(m["task"] == config["task"], "model.task", m["task"], f"the run's task, {config['task']!r}")


def _store_task_rules(config, need) -> None:
    _model_rules(config, need)
    m, p, d, t = (config.get(b) or {} for b in ("model", "pretrain", "data", "train"))
    clip = [m.get(k) for k in ("clip_len", "height", "width")]
    if isinstance(p.get("mask_blocks"), int) and all(isinstance(x, int) and x >= 1 for x in clip):
        # More boxes than the clip has tokens mask nothing more (the union is the whole clip long
        # before), and the step's and its bound's arrays grow with them ([clips, blocks, 3]).
        tokens = math.prod(clip)
        need(p["mask_blocks"] <= tokens, "pretrain.mask_blocks", p["mask_blocks"],
             f"<= the clip's {tokens} tokens (model.clip_len x height x width = {' x '.join(map(str, clip))})")
    # Accumulation splits the update's batch into equal micro-batches (the task's own block).
    k, batch = (config.get(config.get("task")) or {}).get("micro_batches"), d.get("batch_size")
    if isinstance(k, int) and k >= 1 and isinstance(batch, int) and batch >= 1:
        need(batch % k == 0, f"{config['task']}.micro_batches", k, f"a divisor of config.data.batch_size={batch}")
    if isinstance(t.get("epochs"), _NUMBER) and not t.get("num_steps"):
        need(t["epochs"] > 0, "train.epochs", t["epochs"], "> 0 (or set train.num_steps)")
    if "logical_axis_rules" in (config.get("mesh") or {}):
        _rules(config, need)


def _rules(config, need) -> None:
    from vimpac_jax.training.sharding import logical_axis_rules

    try:
        logical_axis_rules(config["mesh"])
    except ValueError as e:  # its message names config.mesh.logical_axis_rules and the rule
        need(False, "", None, str(e))


def _tokenizer_rules(config, need) -> None:
    o, d, t = (config.get(b) or {} for b in ("optim", "data", "train"))
    steps, warmup = t.get("num_steps"), o.get("warmup")
    if isinstance(steps, int):
        need(steps >= 1, "train.num_steps", steps, ">= 1 (the tokenizer's run has no epochs)")
    if isinstance(steps, int) and steps >= 1 and isinstance(warmup, _NUMBER) and math.isfinite(warmup):
        from vimpac_jax.training.optimizer import warmup_steps

        need(warmup_steps(dict(warmup=warmup, total_steps=steps)) <= steps, "optim.warmup", warmup,
             f"in [0, train.num_steps={steps}] (< 1: a fraction of it)")
    if isinstance(d.get("size"), int):
        need(d["size"] % 8 == 0, "data.size", d["size"], "a multiple of 8 (the tokenizer's down-sampling)")
    widths = (config.get("model") or {}).get("widths")
    if isinstance(widths, (list, tuple)):
        from vimpac_jax.tokenizer.vq import NUM_GROUPS

        need(len(widths) == NUM_GROUPS and all(isinstance(w, int) and w > 0 and w % 4 == 0 for w in widths),
             "model.widths", widths, f"{NUM_GROUPS} positive multiples of 4 (one per group)")
    if "logical_axis_rules" in (config.get("mesh") or {}):
        _rules(config, need)


RULES = {"pretrain": _store_task_rules, "finetune": _store_task_rules, "tokenizer": _tokenizer_rules}


# ----------------------------------------------------------------------------------------------

def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value


def _unknown(name: str, where: str, known) -> str:
    near = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {near[0]}?" if near else f" (its fields: {', '.join(known)})"
    return f"config.{where}{name} is not a field of {'config.' + where[:-1] if where else 'a config'}{hint}"


def problems(config: Mapping[str, Any]) -> list[str]:
    """Every problem of a run config (a ConfigDict or a dict), as 'config.FIELD=VALUE must be ...'."""
    found: list[str] = []

    def need(ok: bool, field: str, value, expected: str) -> None:
        """A rule: unless `ok`, 'config.FIELD=VALUE must be EXPECTED' (no FIELD: EXPECTED as it is)."""
        if not ok:
            found.append(f"config.{field}={_plain(value)!r} must be {expected}" if field else expected)

    task = config.get("task")
    if task not in SCHEMAS:
        return [f"config.task={task!r} must be one of {', '.join(map(repr, SCHEMAS))}"]
    schema = SCHEMAS[task]()
    for name in config.keys():
        spec, value = schema.get(name), config[name]
        if spec is None:
            found.append(_unknown(name, "", schema))
        elif isinstance(spec, dict):
            if not hasattr(value, "keys"):
                found.append(f"config.{name} must be a block of fields ({', '.join(spec)}), got {_plain(value)!r}")
                continue
            for field in value.keys():
                if field not in spec:
                    found.append(_unknown(field, f"{name}.", spec))
                elif (why := spec[field].problem(value[field])) is not None:
                    found.append(f"config.{name}.{field}={_plain(value[field])!r} {why}")
        elif (why := spec.problem(_plain(value))) is not None:
            found.append(f"config.{name}={_plain(value)!r} {why}")
    if not found:  # the rules read values whose types and ranges are known to be right
        RULES[task](config, need)
    return found


def defaults(task: str):
    """Every block of a TASK config at its one definition's defaults (a ConfigDict); None for a
    task no schema has (`check` names it)."""
    if task not in SCHEMAS:
        return None
    from vimpac_jax.configs import common
    from vimpac_jax.models.config import model_config

    if task == "tokenizer":
        return common.tokenizer_config()  # its size and length have none (0): a preset gives them
    config = common.base_config(task)
    config.model = model_config(task=task)  # the size has no default (0): a model block must give it
    return config


def complete(config) -> list[str]:
    """Adds to `config` (a ConfigDict, in place) the fields its blocks lack (a config written
    before they existed, or built by hand) at their blocks' defaults; returns them, dotted.
    Blocks and fields that no task block has are left for `check` to name."""
    base = defaults(config.get("task"))
    if base is None:
        return []
    added = []
    with config.ignore_type(), config.unlocked():  # a loaded config is locked (config_utils)
        for name in base.keys():
            if name not in config:
                config[name] = base[name]
                added.append(name)
            elif hasattr(base[name], "keys") and hasattr(config[name], "keys"):
                for field in base[name].keys():
                    if field not in config[name]:
                        config[name][field] = base[name][field]
                        added.append(f"{name}.{field}")
    return added


def resolve(config):
    """`config` completed (`complete`) and checked (`check`): what the library is handed. Returns it."""
    complete(config)
    check(config)
    return config


def check_block(task: str, block: str, values: Mapping[str, Any]) -> None:
    """ValueError naming the fields of one block (`config.BLOCK`) of a TASK config that are unknown
    or out of range: for whoever assembles a single block outside a config (benchmarks, tests)."""
    check({"task": task, block: values})


def check(config: Mapping[str, Any]) -> None:
    """ValueError naming every field of `config` that is unknown or out of its type or range
    (one line: the problems joined by '; '). Reads no file."""
    found = problems(config)
    if found:
        raise ValueError("; ".join(found))
