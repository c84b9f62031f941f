"""The pre-training step's profile on a TPU without a TPU: XLA's TPU cost model, side by side with
the plain-JAX measuring stick.

Compiles, on a CPU host with libtpu installed (`pip install -e ".[tpu]"`), the project's
pre-training step (`training/pretrain_step.py`, the model and step this checkout builds, as
`benchmarks/pretrain_step.py` configures it: --preset, --set) and, with --plain, the plain-JAX
step of `../shared/perf/plain_jax_step.py` (the same model without dropout; a measuring stick,
not the product) at the same clips per chip and number of layers, for the first --chips chips of
a TPU slice (`vimpac_jax/aot/chips.py` names). For each it prints: the cost model's estimated
cycles summed over the compiled program's ENTRY instructions (`vimpac_jax/aot/hlo_cycles.py`)
and that sum as a step time at the chip's clock, clips/s per chip and the fraction of the bf16
peak from the REQUIRED FLOPs (`vimpac_jax/aot/flops.py`: the same count for both steps), XLA's
FLOPs and bytes accessed, HBM per chip, the cycles' share by opcode (copies: layout changes),
and the top source ops (JAX op names, layer indices folded).

A compile is an estimate, not a run: the cost model's cycles, not a measured time.

    python benchmarks/tpu_step_profile.py --topology v5p-8 --chips 1 --preset small --clips 256 \\
        --plain ../shared/perf/plain_jax_step.py
    # a quick proxy (2 layers, 32 clips): the profile's shape, not its size
    python benchmarks/tpu_step_profile.py --topology v5p-8 --chips 1 --clips 32 --set model.num_layers=2

Layers unrolled (the presets' model.scan_layers=False): a scanned loop's body would be one
instruction of the ENTRY computation.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = os.path.dirname(_HERE)  # benchmarks/tokenize.py would shadow the standard library's

from vimpac_jax.aot import compile as aot  # noqa: E402

aot.prepare_tpu_environment()  # before jax is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import pretrain_step as bench  # noqa: E402
from vimpac_jax.aot import flops as flops_lib  # noqa: E402
from vimpac_jax.aot import hlo_cycles  # noqa: E402
from vimpac_jax.training import pretrain_step as ps  # noqa: E402
from vimpac_jax.training import sharding as shd  # noqa: E402


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5p-8", help="TPU slice (v5p-8, v5e-4, v5p:2x2x1, ...)")
    p.add_argument("--chips", type=int, default=1, help="compile for the first N chips of the slice")
    p.add_argument("--preset", choices=bench.PRESETS, default="small")
    p.add_argument("--clips", type=int, default=256, help="clips per chip (2 per video)")
    p.add_argument("--set", action="append", default=[], metavar="BLOCK.FIELD=VALUE",
                   help="as benchmarks/pretrain_step.py's, e.g. model.num_layers=2 (the plain step follows the layers)")
    p.add_argument("--plain", default="", help="path of plain_jax_step.py to compile it too (e.g. ../shared/perf/...)")
    p.add_argument("--only", choices=("ours", "plain"), default="",
                   help="compile one of the two (with --plain for 'plain'): the other's compile takes minutes")
    p.add_argument("--top", type=int, default=15, help="source ops listed per program")
    p.add_argument("--depth", type=int, default=5, help="path parts of a source op kept when grouping")
    p.add_argument("--dump-hlo", default="", help="write each compiled module's text to DIR/<program>.hlo")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_args(argv)
    if args.clips <= 0 or args.clips % 2 or args.chips <= 0:
        p.error("--clips must be a positive even number (2 clips per video), --chips positive")
    return args


def _target(args):
    target = aot.tpu_target(args.topology)
    if args.chips > len(target.devices):
        raise SystemExit(f"--chips {args.chips}: {args.topology} has {len(target.devices)}")
    return dataclasses.replace(target, devices=target.devices[:args.chips])


def our_program(args, target):
    """(Program, model_cfg) of the project's pre-training step, data-parallel over the chips."""
    videos = args.clips * len(target.devices) // 2
    bargs = bench._parse(["--preset", args.preset, "--batch-size", str(videos), "--mesh=-1,1,1"]
                         + sum((["--set", s] for s in args.set), []))
    model_cfg, optim_cfg, pretrain_cfg = bench.configs(bargs)
    mesh = shd.make_mesh(bargs.mesh_sizes, devices=list(target.devices))
    sh = ps.train_state_shardings(model_cfg, optim_cfg, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         ps.abstract_train_state(model_cfg, optim_cfg), sh)
    step = ps.make_pretrain_step(model_cfg, optim_cfg, pretrain_cfg, mesh, state_shardings=sh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shd.batch_sharding(mesh))
             for k, v in bench._fake_batch(bargs, model_cfg).items()}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shd.replicated(mesh))
    parts, _ = flops_lib.required_flops_per_clip("pretrain", model_cfg, pretrain_cfg)
    clips = 2 * videos
    return aot.Program("ours", step, (state, batch, key), clips=clips, batch=f"{videos} videos x 2 clips",
                       required_flops=3 * sum(parts.values()) * clips), model_cfg


def plain_program(args, target, model_cfg):
    """Program of plain_jax_step.py's step on the first chip, at our clips per chip and layers."""
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    spec = importlib.util.spec_from_file_location("plain_jax_step", args.plain)
    pj = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pj)
    # The plain file's sizes where it has the preset; Base (absent there) from our model config.
    if args.preset in pj.PRESETS:
        _, d, halve, nce_layers, nce_hidden = pj.PRESETS[args.preset]
    else:
        d, halve = int(model_cfg["hidden_dim"]), bool(model_cfg["halve_att"])
        nce_layers, nce_hidden = int(model_cfg["proj_layers"]), int(model_cfg["proj_hidden_dim"])
    layers = int(model_cfg["num_layers"])
    t, h, w = model_cfg["clip_len"], model_cfg["height"], model_cfg["width"]
    cfg = ((("T",), ("H", "W")), d // 64, 5, int(math.ceil(0.25 * t * h * w)), jnp.bfloat16)
    params = jax.eval_shape(lambda k: pj.init(k, layers, d, halve, t, h, w, nce_layers, nce_hidden),
                            jax.random.PRNGKey(0))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b1=0.9, b2=0.98, weight_decay=0.05))
    opt_state = jax.eval_shape(opt.init, params)

    def step(p, s, codes, key):
        (loss, _), g = jax.value_and_grad(pj.loss_fn, has_aux=True)(p, codes, key, cfg)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    rep = NamedSharding(Mesh(np.array(target.devices[:1]), ("d",)), PartitionSpec())
    put = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)  # noqa: E731
    codes = jax.ShapeDtypeStruct((args.clips, t, h, w), jnp.int32, sharding=rep)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    parts, _ = flops_lib.required_flops_per_clip("pretrain", model_cfg, {"mask_blocks": 5})
    return aot.Program("plain", jax.jit(step, donate_argnums=(0, 1)), (put(params), put(opt_state), codes, key),
                       clips=args.clips, batch=f"{args.clips} clips", required_flops=3 * sum(parts.values()) * args.clips)


class _KeepCompiled:
    """A jitted function whose `lower(...).compile()` keeps the executable (for its HLO text)."""

    def __init__(self, jitted):
        self.jitted, self.compiled = jitted, None

    def lower(self, *args):
        lowered = self.jitted.lower(*args)
        outer = self

        class _Lowered:
            def compile(self):
                outer.compiled = lowered.compile()
                return outer.compiled

        return _Lowered()


def copy_share(cycles: hlo_cycles.CycleReport) -> float:
    """Share of the cycles in copy instructions and copy fusions (layout changes)."""
    copies = sum(c for op, c in cycles.by_opcode if op == "copy" or op.startswith("copy"))
    return copies / max(cycles.total_cycles, 1)


def main(argv=None) -> int:
    args = _parse(argv)
    target = _target(args)
    program, model_cfg = our_program(args, target)
    programs = [] if args.only == "plain" else [program]
    if args.only == "plain" and not args.plain:
        raise SystemExit("--only plain needs --plain PATH (the plain-JAX step's file)")
    if args.plain and args.only != "ours":
        target_one = dataclasses.replace(target, devices=target.devices[:1])
        programs.append(plain_program(args, target_one, model_cfg))
    import libtpu  # noqa: F401  (its version, for the record)
    from importlib.metadata import version
    print(f"jax {jax.__version__}, libtpu {version('libtpu')}; {target.name}, first {args.chips} chip(s); "
          f"{args.preset} ({model_cfg['num_layers']} layers), {args.clips} clips per chip; --set {args.set or 'none'}")
    print("A compile is an estimate, not a run: XLA's TPU cost model, summed over the ENTRY instructions.")
    rows = {}
    for prog in programs:
        tgt = target if prog.name == "ours" else dataclasses.replace(target, devices=target.devices[:1])
        keep = _KeepCompiled(prog.jitted)
        r = aot.compile_program(dataclasses.replace(prog, jitted=keep), tgt)
        rows[prog.name] = r
        print(aot.format_report(r, tgt, top=0))
        if keep.compiled is None:
            continue
        text = keep.compiled.as_text()
        if args.dump_hlo:
            os.makedirs(args.dump_hlo, exist_ok=True)
            with open(os.path.join(args.dump_hlo, f"{prog.name}.hlo"), "w") as f:
                f.write(text)
        r.cycles = hlo_cycles.cycle_report(text, depth=args.depth, chip=tgt.generation)
        print(f"  copies: {copy_share(r.cycles):.1%} of the cycles")
        print("\n".join("    " + line for line in hlo_cycles.format_report(r.cycles, top=args.top).splitlines()))
    if len(rows) == 2 and rows["ours"].estimated_cycles and rows["plain"].estimated_cycles:
        ours_per_clip = rows["ours"].estimated_cycles / (rows["ours"].clips / args.chips)
        plain_per_clip = rows["plain"].estimated_cycles / rows["plain"].clips
        print(f"ours / plain, estimated cycles per clip: {ours_per_clip / plain_per_clip:.3f}")
    if args.json:
        print(json.dumps({name: {k: v for k, v in r.to_json().items() if k != "message"} for name, r in rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
