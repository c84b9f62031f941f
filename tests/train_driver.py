"""Runs `vimpac_jax.training.train.train` in a subprocess for the interruption tests.

usage: python tests/train_driver.py CONFIG_JSON WORKDIR STEP_DELAY_SECONDS
CONFIG_JSON holds {"config": "configs/pretrain.py:runlocal", "overrides": {"data.train_store": ...}}.
The delay after each step gives a test time to kill the run in the middle.
"""

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_config(spec: dict):
    from vimpac_jax.config_utils import load_config

    args = ["--config", str(REPO / spec["config"])]
    args += [f"--config.{k}={v}" for k, v in spec.get("overrides", {}).items()]
    return load_config(args)


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    delay = float(sys.argv[3])
    from vimpac_jax import logs
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training.train import exit_code, train

    logs.setup()  # status lines ("resumed from ...") on stderr, as under `vimpac train`

    result = train(build_config(spec), sys.argv[2], make_task, on_step=lambda step: time.sleep(delay))
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, bool))}))
    sys.exit(exit_code(result))  # as `vimpac train`
