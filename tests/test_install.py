"""A non-editable install (`pip install .`) works from another directory: the packaged configs
and shell launchers are found without the checkout (tests/installed_copy.py builds it; the demo
chain of tests/test_demo.py runs `vimpac demo --preset smoke` from the same install)."""

import json
import stat
from pathlib import Path

import pytest

from installed_copy import REPO, installed_vimpac
from vimpac_jax.commands.params import parameter_counts
from vimpac_jax.config_utils import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return installed_vimpac(tmp_path_factory)


def test_the_install_imports_its_own_copy_with_configs_and_launchers(installed, tmp_path):
    paths = json.loads(installed.python(
        "import json, vimpac_jax, vimpac_jax.configs, vimpac_jax.launch; from importlib import resources; "
        "print(json.dumps([vimpac_jax.__file__, vimpac_jax.configs.__file__, "
        "str(resources.files('vimpac_jax.launch') / 'slurm_gpu.sbatch')]))", cwd=tmp_path))
    for p in paths:
        assert Path(p).is_file() and Path(p).is_relative_to(installed.prefix), p  # not the checkout's
    assert Path(paths[2]).read_bytes() == (REPO / "launch" / "slurm_gpu.sbatch").read_bytes()


def test_params_resolves_the_packaged_config_outside_a_checkout(installed, tmp_path):
    result = installed.run("params", "--config", "configs/pretrain.py:small", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = parameter_counts(load_config(["--config", str(REPO / "configs" / "pretrain.py:small")]).model.to_dict())
    assert f"total_params={sum(expected.values())}" in result.stdout.splitlines()
    missing = installed.run("params", "--config", "configs/nope.py:small", cwd=tmp_path, timeout=300)
    assert missing.returncode == 2 and "configs/nope.py not found" in missing.stderr
    assert "configs/pretrain.py" in missing.stderr and "Traceback" not in missing.stderr


def test_slurm_sweep_outside_a_checkout_runs_tasks_through_the_installed_launcher(installed, tmp_path):
    bin_dir = tmp_path / "bin"  # a stand-in sbatch records what it is given
    bin_dir.mkdir()
    record = tmp_path / "sbatch_args.txt"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {record}\necho 'Submitted batch job 7'\n")
    (bin_dir / "sbatch").chmod((bin_dir / "sbatch").stat().st_mode | stat.S_IEXEC)
    result = installed.run("sweep", "--config", "configs/pretrain.py:runlocal", "--config.data.train_store=/data/s",
                           "--sweep", "configs/sweeps/masking.py", "--workdir", "sw", "--launcher", "slurm",
                           cwd=tmp_path, path_prefix=(bin_dir,), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path / "sw"
    assert "Submitted batch job 7" in result.stdout and record.read_text().split() == [str(root / "sweep.sbatch")]
    script = (root / "sweep.sbatch").read_text()
    task_line = next(line for line in script.splitlines() if line.startswith("eval bash "))
    launcher = Path(task_line.split()[2])  # eval bash LAUNCHER $CMD
    assert launcher.is_file() and launcher.is_relative_to(installed.prefix) and launcher.name == "slurm_gpu.sbatch"
    commands = (root / "commands.txt").read_text().splitlines()
    assert len(commands) == 2 and "--config.pretrain.mask_kind=iid" in commands[1]
