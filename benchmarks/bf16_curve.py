"""Does a bfloat16 run follow the float32 loss curve? Two runs of `vimpac train` (the training
loop itself, `configs/pretrain.py:runlocal` unless --config says otherwise) on the same small
store, seed and steps, differing only in model.dtype; reports the largest deviation of the
logged total, MLM and NCE losses.

    python benchmarks/bf16_curve.py --steps 200                # tiny model, CPU: a few minutes
    python benchmarks/bf16_curve.py --steps 200 --set config.model.dropout=0.1

The store: `vimpac_jax.data.testing.write_test_store` (random codes, 32 videos, 4x4 tokens);
the loss on random codes can only fall from ln(8197) to the codes' entropy, so the check is of
the numerics of the step (masking, packing, the padded vocabulary, the MLM and NCE losses, the
optimizer in float32 state) under bf16 compute, not of learning. Appends a section to
benchmarks/RESULTS.md (--append-results '' to skip).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = _ROOT  # benchmarks/tokenize.py would shadow the standard library's tokenize

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vimpac_jax.config_utils import load_config  # noqa: E402
from vimpac_jax.data.testing import write_test_store  # noqa: E402
from vimpac_jax.tasks.registry import make_task  # noqa: E402
from vimpac_jax.training.train import train  # noqa: E402

LOSSES = ("train/total_loss", "train/mlm_loss", "train/nce_loss")


def run(config_arg: str, store: Path, workdir: Path, dtype: str, steps: int, extra: list) -> dict:
    config = load_config(["--config", config_arg, f"--config.data.train_store={store}",
                          f"--config.train.num_steps={steps}", f"--config.optim.schedule_steps={steps}",
                          "--config.train.log_every=1",
                          f"--config.train.checkpoint_every={steps}", f"--config.model.dtype={dtype}", *extra])
    start = time.perf_counter()
    train(config, workdir, make_task)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    rows = [r for r in rows if LOSSES[0] in r]
    return {"seconds": seconds, "steps": [r["step"] for r in rows],
            **{name: np.array([r[name] for r in rows]) for name in LOSSES}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(_ROOT, "configs", "pretrain.py:runlocal"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--set", action="append", default=[], metavar="config.A.B=VALUE",
                   help="more --config.* overrides for both runs")
    p.add_argument("--append-results", default=os.path.join(_HERE, "RESULTS.md"))
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    extra = [f"--{s}" if not s.startswith("--") else s for s in a.set]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        videos = [dict(video_id=f"v{i:03d}", num_frames=4 + i % 5) for i in range(a.videos)]
        store = write_test_store(tmp / "store", videos, grid=(4, 4), seed=0)
        runs = {dtype: run(a.config, store, tmp / dtype, dtype, a.steps, extra) for dtype in ("float32", "bfloat16")}
    f32, bf16 = runs["float32"], runs["bfloat16"]
    assert f32["steps"] == bf16["steps"], "the two runs logged different steps"
    deviation = {name: float(np.abs(bf16[name] - f32[name]).max()) for name in LOSSES}
    relative = {name: float((np.abs(bf16[name] - f32[name]) / np.abs(f32[name])).max()) for name in LOSSES}
    lines = [f"steps {a.steps}, logged {len(f32['steps'])}; float32 {f32['seconds']:.0f} s, bfloat16 "
             f"{bf16['seconds']:.0f} s; total loss float32 {f32[LOSSES[0]][0]:.4f} -> {f32[LOSSES[0]][-1]:.4f}, "
             f"bfloat16 {bf16[LOSSES[0]][0]:.4f} -> {bf16[LOSSES[0]][-1]:.4f}"]
    lines += [f"{name}: max |bf16 - f32| = {deviation[name]:.4g} (relative {relative[name]:.3g})" for name in LOSSES]
    print("\n".join(lines))
    if a.append_results:
        section = [f"## bfloat16 against float32 loss curves (`benchmarks/bf16_curve.py`), {datetime.date.today()}", "",
                   f"Device: {jax.devices()[0].device_kind}; jax {jax.__version__}; config {os.path.basename(a.config)} "
                   f"{' '.join(a.set)}; store: {a.videos} random-code videos, 4x4 tokens; seed 0; same steps and "
                   "data in both runs, only model.dtype differs.", ""]
        if a.note:
            section += [a.note, ""]
        section += ["| loss | max abs deviation | max relative deviation |", "|---|---|---|"]
        section += [f"| {name} | {deviation[name]:.4g} | {relative[name]:.3g} |" for name in LOSSES]
        section += ["", lines[0]]
        with open(a.append_results, "a") as f:
            f.write("\n" + "\n".join(section) + "\n")
        print(f"appended to {a.append_results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
