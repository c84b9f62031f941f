"""What the transformer layers cost the training loss, measured on any backend (CPU included).

For the pre-training loss (`pretrain_step.micro_batch_loss`: backbone, MLM at masked positions,
InfoNCE) of a fixed masked batch, differentiated with respect to the parameters, prints:
  saved_residual_bytes_per_clip  bytes JAX keeps for the backward (`jax.ad_checkpoint.saved_residuals`
                                 on the loss, parameters and inputs excluded), per clip;
  bytes_accessed_per_clip        `cost_analysis()['bytes accessed']` of the compiled loss + gradient;
  dots                           dot ops of the compiled HLO by (operand dtypes -> result dtype);
  kernels                        top-level instructions of the compiled entry computation;
  lowered dot / compiled dot     dot ops by dtypes, before and after XLA's optimisation;
  compile_s                      compile wall time.

    python benchmarks/layer_memory.py --preset small --videos 2 --dtype bfloat16
    python benchmarks/layer_memory.py --preset small --set remat=dots --set scan_layers=true

`--set NAME=VALUE` overrides a `model.*` field (Python literal or string).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = _ROOT

import argparse  # noqa: E402
import ast  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
# Public jax only has print_saved_residuals; this is the list it prints.
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402

from vimpac_jax.configs import common  # noqa: E402
from vimpac_jax.models.config import MODEL_PRESETS  # noqa: E402
from vimpac_jax.models.model import build_model, init_variables  # noqa: E402
from vimpac_jax.training import pretrain_step as ps  # noqa: E402
from vimpac_jax.training.masking import IGNORE_LABEL  # noqa: E402


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(text.lower(), text)


def hlo_counts(hlo_text: str) -> dict:
    """Dots by dtypes and top-level kernels of an optimized HLO module's entry computation."""
    shapes = {}
    dots = collections.Counter()
    for m in re.finditer(r"%?([\w.\-]+) = (\w+)\[[^\]]*\][^ ]* (\w+)\(([^)]*)\)", hlo_text):
        shapes[m.group(1)] = m.group(2)
    for m in re.finditer(r"= (\w+)\[[^\]]*\][^ ]* dot\(([^)]*)\)", hlo_text):
        operands = re.findall(r"(\w+)\[", m.group(2))
        if not operands:  # operands printed by name only
            operands = [shapes.get(n.strip().lstrip("%"), "?") for n in m.group(2).split(",")]
        dots[f"{' x '.join(operands)} -> {m.group(1)}"] += 1
    entry = hlo_text[hlo_text.find("ENTRY"):]
    entry = entry[:entry.find("\n}")]
    kernels = sum(1 for line in entry.splitlines()[1:]
                  if " = " in line and not re.search(r" (parameter|constant|get-tuple-element|tuple|bitcast)\(", line))
    return {"dots": dict(sorted(dots.items())), "kernels": kernels}


def lowered_dots(stablehlo_text: str) -> dict:
    """dot_general ops of the lowered (pre-optimisation) StableHLO by operand and result dtypes:
    the dtypes the program asks for (a CPU compile may upcast bf16 dots to f32 afterwards)."""
    dots = collections.Counter()
    for m in re.finditer(r"stablehlo\.dot_general .*?: \(tensor<(?:[^>]*x)?(\w+)>, tensor<(?:[^>]*x)?(\w+)>\) -> tensor<(?:[^>]*x)?(\w+)>",
                         stablehlo_text):
        dots[f"{m.group(1)} x {m.group(2)} -> {m.group(3)}"] += 1
    return dict(sorted(dots.items()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=sorted(MODEL_PRESETS))
    p.add_argument("--videos", type=int, default=2, help="videos per step (2 clips each)")
    p.add_argument("--clip-len", type=int, default=5)
    p.add_argument("--frame-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--no-compile", action="store_true", help="saved residuals and lowered dots only")
    p.add_argument("--top", type=int, default=0, help="also list the N largest saved residuals")
    args = p.parse_args(argv)

    model_cfg = common.model_config(args.preset, clip_len=args.clip_len, frame_size=args.frame_size)
    model_cfg.dtype = args.dtype
    for item in args.set:
        name, _, value = item.partition("=")
        model_cfg[name] = _literal(value)
    pretrain_cfg = ps.pretrain_config()
    model = build_model(model_cfg)
    params = jax.jit(lambda k: nn.unbox(init_variables(model, model_cfg, k))["params"])(jax.random.key(0))
    clip = ps.clip_shape(model_cfg)
    tokens = jax.random.randint(jax.random.key(1), (args.videos, 2, *clip), 0, 8192)
    max_masked = ps.resolve_max_masked(pretrain_cfg, model_cfg)
    masked = jax.jit(functools.partial(ps.mask_batch, pretrain_cfg=pretrain_cfg, max_masked=max_masked))(
        tokens, jax.random.key(2))
    total = (masked["labels"] != IGNORE_LABEL).sum()
    loss = functools.partial(ps.micro_batch_loss, model=model, pretrain_cfg=pretrain_cfg,
                             total_scored=total, num_micro=1)

    def scalar_loss(params, masked, key):
        return loss(params, {}, masked, key)[0]

    clips = 2 * args.videos
    key = jax.random.key(3)
    saved = saved_residuals(scalar_loss, params, masked, key)
    # Residuals that are the parameters themselves (argnums) are not activations.
    act = [(aval, why) for aval, why in saved if "argument" not in why and "from the argument" not in why]
    saved_bytes = sum(a.size * a.dtype.itemsize for a, _ in act)
    by_dtype = collections.Counter()
    for a, _ in act:
        by_dtype[str(a.dtype)] += a.size * a.dtype.itemsize
    print(f"model={dict(model_cfg)}")
    print(f"jax={jax.__version__} backend={jax.default_backend()} videos={args.videos} clips={clips}")
    print(f"saved_residual_bytes_per_clip={saved_bytes // clips}")
    print(f"saved_residuals={len(act)} by_dtype_per_clip={ {k: v // clips for k, v in by_dtype.items()} }")
    grad = jax.jit(jax.value_and_grad(scalar_loss))
    lowered = grad.lower(params, masked, key)
    for k, v in lowered_dots(lowered.as_text()).items():
        print(f"lowered dot {k}: {v}")
    for aval, why in sorted(act, key=lambda r: -r[0].size * r[0].dtype.itemsize)[:args.top]:
        print(f"residual {aval.str_short()} {aval.size * aval.dtype.itemsize // clips} B/clip: {why}")
    if args.no_compile:
        return
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    counts = hlo_counts(compiled.as_text())
    print(f"bytes_accessed_per_clip={int(cost.get('bytes accessed', 0)) // clips}")
    print(f"flops_per_clip={int(cost.get('flops', 0)) // clips}")
    print(f"compile_s={compile_s:.1f}")
    print(f"kernels={counts['kernels']}")
    for k, v in counts["dots"].items():
        print(f"compiled dot {k}: {v}")


if __name__ == "__main__":
    main()
