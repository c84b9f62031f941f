"""Device mesh, logical-axis rules and the shardings of state and batches.

The model names the axes of every parameter logically ('embed', 'mlp', 'heads', 'vocab', ...;
see `vimpac_jax.models.common`). `LOGICAL_AXIS_RULES` below is the default mapping of those
names to the mesh axes ('data', 'fsdp', 'tensor'); a config overrides the whole table with
`config.mesh.logical_axis_rules` (as the Flax lm1b example's `config.logical_axis_rules` and
MaxText's `logical_axis_rules`), which `vimpac train` makes the active rules of the run
(`nn.logical_axis_rules`, read wherever `rules` is None):

- data:   pure data parallelism; parameters replicated over it.
- fsdp:   data parallelism whose parameters and optimizer state are split over it as well
          (ZeRO-3 style; XLA all-gathers a weight where a matmul needs it).
- tensor: Megatron-style splitting of the MLP, attention-head, vocabulary and projection dims.

The batch is split over ('data', 'fsdp'). A dimension that a mesh axis does not divide (the
vocabulary, 8197 = 7 x 1171, over tensor=2, say) is replicated instead of failing: see
`fit_spec`.

Multi-host: every process calls the same functions with the same mesh; `make_global_batch`
assembles the per-process shares of a batch into global arrays, so a training loop reads only
its own share of the data and nothing else changes with the number of hosts.
"""

import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch dimension is split over

# Logical axis name -> mesh axis (or axes, or None = replicated). Every logical name that the
# model uses must appear here; `check_rules_cover` is called by `state_shardings`.
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),       # model width of every weight: split by FSDP
    ("mlp", "tensor"),       # MLP hidden
    ("heads", "tensor"),     # attention q/k/v features (heads x head_dim)
    ("vocab", "tensor"),     # token embedding rows / MLM output (replicated when 8197 won't split)
    ("embed_out", "tensor"),  # output side of the MLM head's d x d dense
    ("proj", "tensor"),      # hidden width of the contrastive projection head
    ("proj_out", None),      # 256-d projection output: small
    ("classes", None),       # classifier outputs: small
    ("norm", None),          # LayerNorm scales and biases: small
    ("pos", None),           # positional-embedding rows: small
)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1):
    """Default `config.mesh` block: sizes of ('data', 'fsdp', 'tensor'); one -1 takes the rest;
    `logical_axis_rules`: the (logical name, mesh axes) table, LOGICAL_AXIS_RULES by default."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, logical_axis_rules=LOGICAL_AXIS_RULES))


def logical_axis_rules(mesh_cfg: Optional[Mapping[str, Any]]) -> tuple:
    """The rules of a `config.mesh` block (LOGICAL_AXIS_RULES when it sets none), checked: pairs
    (logical name, None | mesh axis | sequence of mesh axes) with distinct names. ValueError
    naming config.mesh.logical_axis_rules otherwise."""
    table = LOGICAL_AXIS_RULES if mesh_cfg is None or "logical_axis_rules" not in mesh_cfg else \
        mesh_cfg["logical_axis_rules"]
    field = "config.mesh.logical_axis_rules"
    rules, seen = [], set()
    for entry in table:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"{field}: each rule is a pair (logical name, mesh axes), got {entry!r}")
        name, axes = entry
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        bad = [a for a in names if a not in MESH_AXES]
        if bad or (axes is not None and not isinstance(axes, str) and not all(isinstance(a, str) for a in names)):
            raise ValueError(f"{field}: rule {name!r} maps to {axes!r}; mesh axes are None or names of {MESH_AXES}")
        if name in seen:
            raise ValueError(f"{field}: logical name {name!r} has more than one rule")
        seen.add(name)
        rules.append((name, axes if axes is None or isinstance(axes, str) else names))
    return tuple(rules)


def active_rules(rules=None) -> tuple:
    """`rules` when given, else the rules made active with `nn.logical_axis_rules(...)` (by `vimpac
    train`, from the config), else LOGICAL_AXIS_RULES."""
    if rules is not None:
        return tuple(rules)
    return tuple(nn.get_logical_axis_rules()) or LOGICAL_AXIS_RULES


def mesh_shape(cfg: Mapping[str, Any], num_devices: int) -> tuple[int, int, int]:
    """Resolves the sizes of ('data', 'fsdp', 'tensor') from a config (one may be -1)."""
    sizes = [int(cfg[name]) if name in cfg else 1 for name in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: each size must be >= 1, at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if free:
        if num_devices % known:
            raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not a "
                             f"multiple of {known}")
        sizes[free[0]] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"but {num_devices} are used")
    return tuple(sizes)


def make_mesh(cfg: Optional[Mapping[str, Any]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
    """The ('data', 'fsdp', 'tensor') mesh of `cfg` (default: all devices on 'data').

    Axes are Auto (not jax's default Explicit) because flax linen's logical partitioning and
    GSPMD propagation expect Auto axes. `devices` defaults to all devices of all processes.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg if cfg is not None else {"data": -1}, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
    """Drops the mesh axes of every dimension of `shape` they do not divide evenly.

    E.g. P('tensor', 'fsdp') for the [8197, 512] embedding on tensor=2 -> P(None, 'fsdp').
    Replicating such a (small or odd) dimension costs memory, never correctness.
    """
    fitted = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = int(np.prod([mesh.shape[a] for a in names]))
        fitted.append(axes if shape[i] % size == 0 else None)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def used_logical_names(boxed_tree: Any) -> set:
    """All logical axis names of the LogicallyPartitioned leaves of a (boxed) variable tree."""
    names = set()
    for spec in jax.tree.leaves(nn.get_partition_spec(boxed_tree), is_leaf=lambda x: isinstance(x, P)):
        for axes in spec:
            if axes is not None:
                names.update((axes,) if isinstance(axes, str) else axes)
    return names


def check_rules_cover(boxed_tree: Any, rules=None) -> None:
    """Raises if the model uses a logical axis name that `rules` (default: `active_rules()`) does
    not map (a silent replication of a large weight is a memory bug that is hard to find later)."""
    missing = used_logical_names(boxed_tree) - {name for name, _ in active_rules(rules)}
    if missing:
        raise ValueError(f"logical axis names {sorted(missing)} have no rule in the logical axis rules "
                         f"(config.mesh.logical_axis_rules; default: LOGICAL_AXIS_RULES of vimpac_jax/training/sharding.py)")


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, rules=None) -> Any:
    """NamedShardings for a tree whose leaves are boxed (nn.LogicallyPartitioned) or plain
    ShapeDtypeStructs / arrays; the result has the unboxed tree's structure.

    Boxed leaves follow `rules` (default: `active_rules()`); plain leaves (step counters,
    BatchNorm statistics) are replicated. Every spec is passed through `fit_spec`.
    """
    rules = active_rules(rules)
    check_rules_cover(abstract_state, rules)
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_state), rules)
    shapes = nn.unbox(abstract_state)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
                        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def _path_keys(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shardings_like_params(abstract_tree: Any, param_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for an optimizer-state-like tree: a leaf whose key path ENDS WITH a parameter's
    path (mu/nu/accumulators: ('0', 'mu', 'backbone', ..., 'kernel')) and has that parameter's
    shape gets the parameter's sharding; every other leaf (counts, scalars) is replicated.
    """
    by_path = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[_path_keys(path)] = sharding
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None and len(sharding.spec) <= len(leaf.shape):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def make_global_batch(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Per-process numpy batch (a pytree of [B_local, ...] arrays) -> global jax arrays
    [B_local * process_count, ...] split over ('data', 'fsdp').

    Each process passes only the rows it read (its contiguous share, in process order); with one
    process this is a plain device_put. B_local must divide evenly over the process's devices.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


@functools.lru_cache(maxsize=None)
def _replicator(mesh: jax.sharding.Mesh):
    return jax.jit(lambda a: a, out_shardings=replicated(mesh))


def to_host(x: jax.Array, mesh: jax.sharding.Mesh) -> np.ndarray:
    """A globally sharded array -> its full value as numpy on every process (small arrays only).

    One jitted identity per mesh, reused: building a fresh one per call would re-trace it every batch."""
    return np.asarray(jax.device_get(_replicator(mesh)(x)))
