"""`vimpac migrate`: a run of the older, unversioned run format is refused by `vimpac train` with
the command to run, and after `vimpac migrate` it resumes to the parameters of a run never
interrupted. The older run is made from a real one by writing its files as older versions did:
no format_version, `model.remat` a boolean, no fine-tuning fields, grain's own iterator state, a
meta without the seed or checksums."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from vimpac_jax.data.testing import write_test_store

REPO = Path(__file__).resolve().parents[1]
# slow: trains for real. The loop in process runs on one device, as `vimpac train` does here.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_device_module")]


def _make_older(run: Path) -> dict:
    """The run as format 0 wrote it; returns each step's checksums as the run recorded them."""
    config = json.loads((run / "config.json").read_text())
    assert config.pop("format_version") == 2 and config["model"]["remat"] == "none"
    assert [config.pop(k) for k in ("variant_set", "eval_crops", "class_names")] == [None, "three", []]
    config["model"]["remat"] = False
    (run / "config.json").write_text(json.dumps(config))
    checksums = {}
    for step_dir in (run / "checkpoints").iterdir():
        meta_file = step_dir / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        del meta["format_version"], meta["seed"]
        checksums[step_dir.name] = meta.pop("checksums")  # written before checkpoints had checksums
        meta_file.write_text(json.dumps(meta))
        (state_file,) = (step_dir / "data").glob("*.json")
        batch = json.loads(state_file.read_text())["next_batch"]
        state_file.write_text(json.dumps({"next_index": batch}))  # grain's own state, 0 workers
    return checksums


def test_an_older_run_is_refused_naming_migrate_and_resumes_exactly_after_it(tmp_path, capsys):
    from vimpac_jax import cli
    from vimpac_jax.config_utils import load_config
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training import train as train_lib
    from vimpac_jax.training import workdir as workdir_lib

    videos = [dict(video_id=f"v{i:02d}", num_frames=4 + i % 5, label=i % 3) for i in range(16)]
    write_test_store(tmp_path / "pool", videos, grid=(4, 4), seed=0)

    config = load_config(["--config", str(REPO / "configs/pretrain.py:runlocal"),
                          f"--config.data.train_store={tmp_path / 'pool'}", "--config.train.num_steps=4",
                          "--config.train.checkpoint_every=1"])

    def stop_at_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as a preemption: the step is saved, the run stops

    assert train_lib.train(config, tmp_path / "ref", make_task)["step"] == 4
    run = tmp_path / "run"
    assert train_lib.train(config, run, make_task, on_step=stop_at_2)["step"] == 2
    checksums = _make_older(run)
    older_config = (run / "config.json").read_text()

    with pytest.raises(workdir_lib.RunFormatError, match=f"run `vimpac migrate --workdir {run}` first"):
        train_lib.train(config, run, make_task)
    assert (run / "config.json").read_text() == older_config  # the refused run changed nothing
    (run / "config.json").unlink()  # without config.json, the checkpoint's meta is refused alike
    with pytest.raises(workdir_lib.RunFormatError, match=f"checkpoint {run / 'checkpoints'} records no run format"):
        train_lib.train(config, run, make_task)
    (run / "config.json").write_text(older_config)

    assert cli.main(["migrate", "--workdir", str(run)]) == 0
    assert "(was 0; 2 of 2 checkpoint steps rewritten)" in capsys.readouterr().out
    migrated = json.loads((run / "config.json").read_text())
    assert migrated["model"]["remat"] == "none" and migrated["format_version"] == 2
    # The fields format 2 added, at what the readers took for an absent field.
    assert (migrated["variant_set"], migrated["eval_crops"], migrated["class_names"]) == (None, "three", [])
    for step, recorded in checksums.items():  # the arrays read back and summed, as the run had summed them
        assert json.loads((run / "checkpoints" / step / "meta" / "metadata").read_text())["checksums"] == recorded
    assert cli.main(["migrate", "--workdir", str(run)]) == 0
    assert "nothing to do" in capsys.readouterr().out

    steps = []
    assert train_lib.train(config, run, make_task, on_step=steps.append)["step"] == 4
    assert steps == [3, 4]  # resumed after step 2
    (step_a, a), (step_b, b) = workdir_lib.restore_variables(tmp_path / "ref"), workdir_lib.restore_variables(run)
    assert step_a == step_b == 4
    import jax

    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_migrate_refuses_a_directory_that_is_no_run(tmp_path, capsys):
    from vimpac_jax import cli

    assert cli.main(["migrate", "--workdir", str(tmp_path)]) == 2
    assert f"vimpac migrate: error: --workdir {tmp_path}: not a training workdir" in capsys.readouterr().err
