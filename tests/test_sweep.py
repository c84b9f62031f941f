"""`vimpac sweep`: expansion of sweep files, the shipped ablation sweeps, launchers and summaries.

One shipped sweep (block vs i.i.d. masking, 2 runs of 2 steps) runs for real on a tiny store;
a second sweep has a run that `vimpac train` rejects, which must show up as failed while the
run after it still runs. The other shipped sweeps are checked by expansion, config loading and
the `print` launcher; VIMPAC_SLOW_TESTS=1 runs all of them for real as well.
"""

import csv
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, run_vimpac
from vimpac_jax.config_utils import load_config
from vimpac_jax.data.testing import write_test_store
from vimpac_jax import sweeps as sw

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "configs" / "sweeps"
RUNLOCAL = "configs/pretrain.py:runlocal"
EXPECTED = {
    # The mask-then-predict analyses (Tables 8, 9, 15) run with the contrastive loss off (alpha = 0).
    "mask_blocks": [{"pretrain.mask_blocks": b, "pretrain.nce_weight": 0.0} for b in (4, 5, 6)],
    "nce_weight": [{"pretrain.nce_weight": a} for a in (0.0, 0.5, 1.0, 2.0)],
    "masking": [{"pretrain.mask_kind": "block", "pretrain.nce_weight": 0.0},
                {"pretrain.mask_kind": "iid", "pretrain.mask_prob": 0.145, "pretrain.nce_weight": 0.0}],
    "layouts": [{"model.layout": layout} for layout in ("T,H|W", "T,H,W", "TxHxW", "T,HxW")],
}


vimpac = run_vimpac


def sweep_cli(capsys, *args):
    """`vimpac sweep ARGS` in this process (no import / start-up cost): (return code, stdout, stderr)."""
    return run_cli(capsys, "sweep", *args)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "pool"
    write_test_store(path, [dict(video_id=f"v{i}", num_frames=6, label=i % 3) for i in range(8)], grid=(4, 4))
    return path


@pytest.fixture(scope="module")
def env():
    """The subprocesses' environment: ours, with conftest's session-wide compilation cache (one
    directory for both xdist workers, so a program compiled by either is compiled once)."""
    assert os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return dict(os.environ)


def base_args(store):
    return ["--config", RUNLOCAL, f"--config.data.train_store={store}", "--config.train.num_steps=2",
            "--config.train.log_every=1"]


# ------------------------------------------------------------------------------------------------
# Expansion.


def test_combinators_expand_exactly():
    a, b = sw.sweep("a", [1, 2]), sw.sweep("b", ["x", "y"])
    assert sw.product(a, b) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert sw.zipit(a, b) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert sw.chain(a, b) == [{"a": 1}, {"a": 2}, {"b": "x"}, {"b": "y"}]
    nested = sw.chain(sw.product(sw.fixed("c", True), sw.zipit(a, b)), sw.fixed("c", False))
    assert nested == [{"c": True, "a": 1, "b": "x"}, {"c": True, "a": 2, "b": "y"}, {"c": False}]
    with pytest.raises(ValueError, match="different lengths"):
        sw.zipit(a, sw.sweep("b", [1, 2, 3]))
    with pytest.raises(ValueError, match=r"\['a'\]"):
        sw.product(a, sw.fixed("a", 3))
    with pytest.raises(ValueError, match="no values"):
        sw.sweep("a", [])


def test_run_names_and_commands(tmp_path):
    runs = sw.expand(EXPECTED["layouts"] + [{"data.train_store": "/x/y z"}], tmp_path)
    assert [r.name for r in runs] == ["00_layout=T,H+W", "01_layout=T,H,W", "02_layout=TxHxW", "03_layout=T,HxW",
                                      "04_train_store=-x-y-z"]
    assert len({r.workdir for r in runs}) == 5 and all(r.workdir.parent == tmp_path for r in runs)
    command = sw.train_command("c.py:a", ["--config.seed=3"], runs[0], ["vimpac"])
    assert command == ["vimpac", "train", "--config", "c.py:a", "--config.seed=3", "--config.model.layout=T,H|W",
                       "--workdir", str(runs[0].workdir)]
    with pytest.raises(ValueError, match="model.layout"):
        sw.train_command("c.py:a", ["--config.model.layout=T"], runs[0], ["vimpac"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_sweeps_expand_and_load(name):
    overrides = sw.load_sweep(SWEEPS / f"{name}.py")
    assert overrides == EXPECTED[name]
    for run in sw.expand(overrides, "/unused"):
        config = load_config(sw.config_flags(RUNLOCAL, [], run.overrides))
        for field, value in run.overrides.items():
            node = config
            for part in field.split("."):
                node = node[part]
            assert node == value and type(node) is type(value), (field, node, value)
    assert (SWEEPS / f"{name}.py").read_text().lstrip('"').startswith(
        {"mask_blocks": "Number of mask blocks", "nce_weight": "Contrastive loss weight", "masking": "Block masking",
         "layouts": "Attention layouts"}[name])
    assert "Table" in (SWEEPS / f"{name}.py").read_text().split('"""')[1]


def test_bad_sweep_files_are_rejected(tmp_path, store, capsys):
    cases = {
        "nofunc.py": ("X = 1\n", "defines no get_sweep"),
        "notlist.py": ("def get_sweep():\n    return {'a': 1}\n", "non-empty list"),
        "badvalue.py": ("def get_sweep():\n    return [{'seed': [1, 2]}]\n", "seed="),
        "typo.py": ("def get_sweep():\n    return [{'seed': 1}, {'pretrain.nce_wieght': 0.5}]\n", "nce_wieght"),
        # Out of its range: refused at load (config_schema), before run 0 starts.
        "range.py": ("def get_sweep():\n    return [{'seed': 1}, {'pretrain.mask_blocks': 0}]\n",
                     "run 01_mask_blocks=0: config.pretrain.mask_blocks=0 must be >= 1"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        code, _, err = sweep_cli(capsys, *base_args(store), "--sweep", tmp_path / name, "--workdir", tmp_path / "w")
        assert code == 2 and message in err, (name, err)
    assert not (tmp_path / "w").exists()  # nothing started: the typo in run 1 stopped run 0 too
    code, _, err = sweep_cli(capsys, *base_args(store), "--sweep", tmp_path / "missing.py", "--workdir", tmp_path / "w")
    assert code == 2 and "missing.py" in err


# ------------------------------------------------------------------------------------------------
# Launchers that only emit commands.


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_print_launcher(name, store, tmp_path, capsys):
    code, out, err = sweep_cli(capsys, *base_args(store), "--sweep", SWEEPS / f"{name}.py", "--workdir",
                               tmp_path / "w", "--launcher", "print")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == len(EXPECTED[name])
    for line, overrides in zip(lines, EXPECTED[name]):
        argv = shlex.split(line)
        assert argv[:2] == ["vimpac", "train"] and f"--config.data.train_store={store}" in argv
        assert [a for a in argv if a.split("=")[0][len("--config."):] in overrides] == [
            f"--config.{k}={v}" for k, v in overrides.items()]
    assert not (tmp_path / "w").exists()


def test_slurm_and_tpu_launchers(store, tmp_path, capsys, monkeypatch):
    # A stand-in sbatch on PATH records what it is given.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch_args.txt"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {record}\necho 'Submitted batch job 42'\n")
    (bin_dir / "sbatch").chmod((bin_dir / "sbatch").stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    root = tmp_path / "s"
    code, out, err = sweep_cli(capsys, *base_args(store), "--sweep", SWEEPS / "masking.py", "--workdir", root,
                               "--launcher", "slurm", "--sbatch=--partition=gpu")
    assert code == 0, err
    assert "Submitted batch job 42" in out and record.read_text().split() == [str(root / "sweep.sbatch")]
    script = (root / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --partition=gpu" in script
    assert f"bash {REPO / 'launch' / 'slurm_gpu.sbatch'}" in script  # the multi-host launcher runs each task
    commands = (root / "commands.txt").read_text().splitlines()
    assert len(commands) == 2 and "--config.pretrain.mask_kind=iid" in commands[1]
    assert json.loads((root / "01_mask_kind=iid_mask_prob=0.145_nce_weight=0.0" / "overrides.json").read_text())["overrides"] == \
        EXPECTED["masking"][1]
    rows = sw.collect(root)  # submitted, not run yet: reported, not dropped
    assert [r["status"] for r in rows] == ["not finished", "not finished"]

    # Run array task 1 of the written script as SLURM would, with stand-in scontrol/srun and a
    # stand-in `vimpac` that fails: its code must land in that run's status.json.
    stand_ins = {"scontrol": "echo localhost",
                 "srun": 'while [ "${1#-}" != "$1" ]; do shift; done\nSLURM_PROCID=0 SLURM_LOCALID=0 exec "$@"',
                 "vimpac": 'echo "ran: $* process=$VIMPAC_PROCESS_ID of $VIMPAC_NUM_PROCESSES"\nexit 3'}
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    task_env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="1")
    task = subprocess.run(["bash", str(root / "sweep.sbatch")], env=task_env, capture_output=True, text=True)
    assert task.returncode == 3, task.stderr
    run_dir = root / "01_mask_kind=iid_mask_prob=0.145_nce_weight=0.0"
    log = (run_dir / "log.txt").read_text()
    assert "ran: train --config" in log and "--config.pretrain.mask_kind=iid" in log and "process=0 of 1" in log
    assert [r["status"] for r in sw.collect(root)] == ["not finished", "failed (rc=3)"]

    code, out, err = sweep_cli(capsys, *base_args(store), "--sweep", SWEEPS / "layouts.py", "--workdir",
                               "gs://b/sweep", "--launcher", "tpu", "--tpu-name", "pod", "--zone", "us-central2-b")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 4 and all(ln.startswith("gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all")
                                   for ln in lines)
    assert "gs://b/sweep/02_layout=TxHxW" in lines[2] and "--config.model.layout=TxHxW" in lines[2]


# ------------------------------------------------------------------------------------------------
# Real local runs.


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_masking_sweep_runs_locally(store, env, tmp_path, capsys):
    root = tmp_path / "masking"
    result = vimpac("sweep", *base_args(store), "--sweep", SWEEPS / "masking.py", "--workdir", root, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[2/2]" in result.stderr and "ETA" in result.stderr
    rows = read_csv(root / "summary.csv")
    assert [r["run"] for r in rows] == ["00_mask_kind=block_nce_weight=0.0", "01_mask_kind=iid_mask_prob=0.145_nce_weight=0.0"]
    for row in rows:
        assert row["status"] == "ok" and row["returncode"] == "0" and row["step"] == "2"
        for metric in ("train/total_loss", "train/mlm_loss", "train/nce_loss", "train/mask_accuracy",
                       "train/mask_ratio"):
            assert float(row[metric]) == float(row[metric])  # a number, not NaN or blank
    assert [r["pretrain.mask_kind"] for r in rows] == ["block", "iid"] and rows[1]["pretrain.mask_prob"] == "0.145"
    # The row's numbers are the run's last logged train metrics.
    logged = [json.loads(ln) for ln in (root / rows[1]["run"] / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "train/total_loss" in r][-1]
    assert float(rows[1]["train/total_loss"]) == last["train/total_loss"] and last["step"] == 2
    resolved = json.loads((root / rows[1]["run"] / "config.json").read_text())
    assert json.dumps(resolved).count('"iid"') == 1  # train saved the resolved config with the override
    markdown = (root / "summary.md").read_text()
    assert markdown.count("| ok |") == 2 and "2/2 runs ok" in markdown and markdown in result.stdout

    # --collect rebuilds the same tables; running the sweep again skips finished runs.
    (root / "summary.csv").unlink()
    (root / "summary.md").unlink()
    assert sweep_cli(capsys, "--collect", root)[0] == 0 and read_csv(root / "summary.csv") == rows
    assert (root / "summary.md").read_text() == markdown
    code, _, err = sweep_cli(capsys, *base_args(store), "--sweep", SWEEPS / "masking.py", "--workdir", root)
    assert code == 0 and err.count("done before, skipped") == 2


@pytest.mark.slow
def test_failed_run_is_reported_not_dropped(store, tmp_path, capsys):
    sweep_file = tmp_path / "with_failure.py"
    # height=8 loads as a config (every field in its range) but `vimpac train` rejects it: the
    # store holds 4x4 tokens per frame. Run 0 fails, run 1 (the runlocal default, whose programs
    # the SIGKILL test below and test_train.py's `vimpac train` runs share) must still run.
    sweep_file.write_text("from vimpac_jax.sweeps import sweep\n\n"
                          "def get_sweep():\n    return sweep('model.height', [8, 4])\n")
    root = tmp_path / "fail"
    code, _, err = sweep_cli(capsys, *base_args(store), "--sweep", sweep_file, "--workdir", root)  # its runs: `vimpac train`
    assert code == 1 and "1 of 2 runs failed" in err
    rows = read_csv(root / "summary.csv")
    assert [(r["run"], r["status"], r["returncode"]) for r in rows] == [
        ("00_height=8", "failed (rc=2)", "2"), ("01_height=4", "ok", "0")]
    assert rows[0]["step"] == "" and rows[0]["train/total_loss"] == "" and "config.model.height" in rows[0]["note"]
    assert rows[1]["step"] == "2" and float(rows[1]["train/total_loss"]) > 0
    markdown = (root / "summary.md").read_text()
    assert "| failed (rc=2) |" in markdown and "1/2 runs ok" in markdown
    assert "the model expects 8x4" in (root / "00_height=8" / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VIMPAC_SLOW_TESTS") != "1", reason="set VIMPAC_SLOW_TESTS=1 (a few minutes)")
@pytest.mark.parametrize("name", ["mask_blocks", "nce_weight", "layouts"])
def test_other_shipped_sweeps_run_locally(name, store, env, tmp_path):
    result = vimpac("sweep", *base_args(store), "--sweep", SWEEPS / f"{name}.py", "--workdir", tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "summary.csv")
    assert len(rows) == len(EXPECTED[name]) and all(r["status"] == "ok" and r["step"] == "2" for r in rows)
    assert all(float(r["train/mlm_loss"]) > 0 for r in rows)


def test_preempted_runs_are_resumed_not_done(tmp_path, monkeypatch):
    """A run that exits PREEMPTED (75) is 'preempted' in the summary, runs again on the next local
    sweep, and requeues its SLURM array task (which survives the SIGTERM to record the code)."""
    from vimpac_jax import exit_codes

    runs = sw.expand([{"seed": 0}, {"seed": 1}], tmp_path / "local")
    # Run 0 exits as a preempted `vimpac train` does; run 1 finishes.
    commands = [[sys.executable, "-c", f"import sys; sys.exit({exit_codes.PREEMPTED})"], [sys.executable, "-c", ""]]
    assert sw.run_local(runs, commands, log=lambda s: None) == [exit_codes.PREEMPTED, 0]
    assert [r["status"] for r in sw.collect(tmp_path / "local")] == ["preempted", "ok"]
    logged = []
    assert sw.run_local(runs, commands, log=logged.append) == [exit_codes.PREEMPTED, 0]
    assert "preempted" in logged[0] and "done before, skipped" in logged[1]  # run 0 ran again

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued.txt"
    stand_ins = {"scontrol": f'echo "$@" >> {requeued}',
                 # a run that gets SLURM's SIGTERM (sent to the whole task here), saves, exits 75
                 "vimpac": f"trap 'exit {exit_codes.PREEMPTED}' TERM\nkill -TERM 0\nsleep 5 & wait"}
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sw.launchers, "launcher_script", lambda name: tmp_path / "absent")  # each task runs `srun COMMAND`
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    runs = sw.expand([{"seed": 0}], tmp_path / "slurm")
    script = sw.write_slurm(runs, [["vimpac", "train"]], tmp_path / "slurm")
    assert "#SBATCH --requeue" in script.read_text() and "#SBATCH --signal=TERM@120" in script.read_text()
    task_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="0",
                    SLURM_ARRAY_JOB_ID="42")
    task = subprocess.run(["setsid", "bash", str(script)], env=task_env, capture_output=True, text=True, timeout=60)
    assert task.returncode == exit_codes.PREEMPTED, task.stderr
    assert [r["status"] for r in sw.collect(tmp_path / "slurm")] == ["preempted"]
    assert requeued.read_text().split() == ["requeue", "42_0"]


def test_a_run_still_going_is_not_started_again_beside_it(tmp_path):
    """A rerun of a sweep that finds a run's workdir held by a live `vimpac train` (a killed
    sweep's child, another sweep) says so and leaves it alone: before, it recorded that run as
    FAILED (rc 2, "workdir in use") after overwriting its log, and started the next run beside it."""
    from vimpac_jax import exit_codes, io_utils

    runs = sw.expand([{"seed": 0}, {"seed": 1}], tmp_path)
    ran = tmp_path / "ran.txt"
    commands = [[sys.executable, "-c", f"open({str(ran)!r}, 'a').write('{i}')"] for i in range(2)]
    runs[0].workdir.mkdir(parents=True)
    (runs[0].workdir / sw.LOG_FILE).write_text("the running train's log\n")
    logged = []
    with io_utils.exclusive_lock(runs[0].workdir / io_utils.WORKDIR_LOCK_FILE, "workdir"):
        assert sw.run_local(runs, commands, log=logged.append) == [exit_codes.PREEMPTED, 0]
    assert f"still running (pid {os.getpid()} on host" in logged[0] and "not started again" in logged[0]
    assert ran.read_text() == "1" and (runs[0].workdir / sw.LOG_FILE).read_text() == "the running train's log\n"
    assert not (runs[0].workdir / sw.STATUS_FILE).exists()
    assert sw.run_local(runs, commands, log=logged.append) == [0, 0]  # the lock is free: it runs now
    assert ran.read_text() == "10"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_a_sweep_killed_with_sigkill_takes_its_running_train_with_it(store, env, tmp_path):
    """SIGKILL of `vimpac sweep` (no handler runs): its `vimpac train` sees the sweep gone, saves
    as on SIGTERM and exits 75, so nothing runs on alone and the next sweep resumes it."""
    import signal
    import time

    import video_fixtures

    sweep_file = tmp_path / "one.py"
    sweep_file.write_text("from vimpac_jax.sweeps import sweep\n\n"
                          "def get_sweep():\n    return sweep('seed', [0])\n")
    root = tmp_path / "sweep"
    # runlocal's own 100-update schedule: the programs of the other runlocal runs (from the session's
    # compilation cache); the sweep is killed at the first logged step, the run stops within a poll
    # of its parent (io_utils.PARENT_POLL_SECONDS), long before step 100.
    args = ["--config", RUNLOCAL, f"--config.data.train_store={store}", "--config.train.num_steps=100",
            "--config.train.log_every=1", "--config.train.checkpoint_every=100000"]
    proc = vimpac("sweep", *args, "--sweep", sweep_file, "--workdir", root, env=env, background=True)
    run_dir = root / "00_seed=0"
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.1)
    train_pid = int((run_dir / ".lock").read_text().split()[0])  # the holder of the workdir's lock
    assert video_fixtures.process_alive(train_pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 120
    while video_fixtures.process_alive(train_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert not video_fixtures.process_alive(train_pid), "the sweep's train runs on alone"
        assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()], "it did not save"
        assert "saved the checkpoint of step" in (run_dir / sw.LOG_FILE).read_text()
    finally:
        if video_fixtures.process_alive(train_pid):
            os.kill(train_pid, signal.SIGKILL)

