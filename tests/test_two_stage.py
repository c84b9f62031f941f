"""Two-stage pre-training: one learning-rate schedule across both stages (the released recipe).

scripts/pretrain/large.sh runs epochs [0, 90) of a 100-epoch linear schedule at 128 px;
large_frame256cont.sh resumes the optimizer AND the scheduler and runs [90, 100) at 256 px. Here
stage 2 starts from stage 1's workdir with `init_from_optimizer`; the schedule continues at the
optimizer's restored update count. The learning rate the optimizer applied is measured from the
parameter update itself (AdamW moves a bias, which has no weight decay, by
-lr * mu_hat / (sqrt(nu_hat) + eps)), not from the number the step logs.
"""

import shlex
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from vimpac_jax.config_utils import load_config
from vimpac_jax.data.testing import write_test_store
from vimpac_jax.tasks.registry import make_task
from vimpac_jax.training import optimizer as opt
from vimpac_jax.training import sharding as shd
from vimpac_jax.training import train as train_lib

REPO = Path(__file__).resolve().parents[1]
STAGE1_STEPS, STAGE2_STEPS = 10, 4
# slow: stage 1 is a real training run (train_lib.train). The loop in process runs on one device, as `vimpac train` does here.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_device_module")]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):  # a training run: the tests that use it are slow
    """A token store and a finished stage 1 in a workdir."""
    root = tmp_path_factory.mktemp("two_stage")
    videos = [dict(video_id=f"v{i:02d}", num_frames=4 + i % 4) for i in range(16)]
    write_test_store(root / "s4", videos, grid=(4, 4), seed=0)
    config = load_config(["--config", str(REPO / "configs/pretrain.py:large_half,runlocal"),
                          f"--config.data.train_store={root / 's4'}", f"--config.train.num_steps={STAGE1_STEPS}"])
    train_lib.train(config, root / "stage1", make_task)
    return root


def stage2_config(root, *overrides):
    """The stage-2 preset at runlocal size (32 px and 2 mask blocks in both stages), so
    that its step is the one stage 1 compiled (the session's compilation cache); the move to
    another frame size is init_from's interpolation, tested in test_train.py."""
    return load_config(["--config", str(REPO / "configs/pretrain.py:large_half,stage2,runlocal"),
                        f"--config.data.train_store={root / 's4'}", f"--config.init_from={root / 'stage1'}",
                        f"--config.train.num_steps={STAGE2_STEPS}", *overrides])


def applied_learning_rate(before, after, opt_state, optim_cfg) -> float:
    """The rate of the update before -> after, from the biases and the new Adam moments."""
    adam = optax.tree_utils.tree_get(opt_state, "ScaleByAdamState")
    t = int(adam.count)
    b1, b2, eps = optim_cfg["b1"], optim_cfg["b2"], optim_cfg["eps"]
    ratios = []
    for path, p0 in jax.tree_util.tree_leaves_with_path(before):
        if getattr(path[-1], "key", None) != "bias":
            continue
        p1 = _at(after, path)
        mu, nu = _at(adam.mu, path), _at(adam.nu, path)
        direction = (mu / (1 - b1 ** t)) / (np.sqrt(nu / (1 - b2 ** t)) + eps)
        keep = np.abs(direction) > 0.1
        ratios.append(-(p1 - p0)[keep] / direction[keep])
    return float(np.median(np.concatenate(ratios)))


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return np.asarray(tree, np.float64)


@pytest.mark.slow
def test_stage2_continues_the_schedule_and_logs_the_applied_rate(stage1):
    config = stage2_config(stage1)
    messages = []
    task = make_task(config, shd.make_mesh(config.mesh), log=messages.append)
    state = task.init_state(jax.random.key(0))
    schedule = opt.make_schedule(task.optim_cfg)
    assert task.schedule_steps == 100 and int(opt.schedule_count(state.opt_state)) == STAGE1_STEPS
    assert any(f"continuing at update {STAGE1_STEPS} of 100" in m for m in messages)
    start = jax.device_get(state.params)
    batches = task.iterator()
    for j in range(STAGE2_STEPS):
        before = jax.device_get(state.params)
        state, metrics = task.step(state, task.global_batch(next(batches)), jax.random.key(j))
        logged = float(metrics["learning_rate"])
        applied = applied_learning_rate(before, jax.device_get(state.params), jax.device_get(state.opt_state),
                                        task.optim_cfg)
        assert logged == pytest.approx(float(schedule(STAGE1_STEPS + j)), rel=1e-6), j
        assert applied == pytest.approx(logged, rel=1e-3), j
    # The first stage-2 rate is the 100-update schedule at N1, past its warm-up: no second warm-up.
    assert float(schedule(STAGE1_STEPS)) > 0.9 * config.optim.learning_rate * (1 - 5 / 95)
    change = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                 for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(start)))
    assert change > 1e-4  # stage 2 trains (the bug: ~1e-10, a learning rate of 0 past the schedule's end)


@pytest.mark.slow
def test_stage2_past_the_end_of_its_schedule_is_an_error(stage1):
    """A stage-2 schedule as long as stage 2 alone would start past its end (rate 0 throughout)."""
    config = stage2_config(stage1, "--config.optim.schedule_steps=4")
    task = make_task(config, shd.make_mesh(config.mesh), log=lambda m: None)
    with pytest.raises(ValueError, match=r"updates \[10, 14\) of a 4-update.*schedule_epochs"):
        task.init_state(jax.random.key(0))


def readme_commands(program: str, command: str) -> list[list[str]]:
    """The README's `vimpac COMMAND ...` lines of its bash blocks, as argv (continuations joined,
    comments dropped)."""
    text = (REPO / "README.md").read_text()
    blocks = [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("bash")]
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [argv for argv in (shlex.split(line, comments=True) for line in lines) if argv[:2] == [program, command]]


def test_readme_commands_are_the_released_recipe():
    """The README's pre-training commands: scripts/pretrain/small.sh is the analysis recipe;
    large.sh + large_frame256cont.sh are stage 1 then stage 2 of one 100-epoch schedule, stage 2
    at 256 px from stage 1's workdir. Its downstream stores are tokenized at 16 fps, a multiple of
    every preset's clip rate (configs/finetune.py), SSV2's without flips."""
    trains = {}
    for argv in readme_commands("vimpac", "train"):
        spec = argv[argv.index("--config") + 1]
        if spec.startswith("configs/pretrain.py"):
            flags = [a for a in argv[2:] if a.startswith("--config.")]
            trains[spec.split(":")[1]] = (load_config(["--config", str(REPO / spec), *flags]),
                                          argv[argv.index("--workdir") + 1])
    assert set(trains) == {"small,analysis", "large_half", "large_half,stage2"}
    small = trains["small,analysis"][0]
    assert (small.train.epochs, small.optim.learning_rate, small.optim.warmup) == (10, 1e-3, 0.1)  # small.sh
    (s1, s1_dir), (s2, _) = trains["large_half"], trains["large_half,stage2"]
    assert s2.init_from == s1_dir and s2.init_from_optimizer  # --resume: the optimizer and the schedule
    assert s1.optim.schedule_epochs == s2.optim.schedule_epochs == s1.train.epochs + s2.train.epochs == 100
    assert (s1.train.epochs, s1.model.height, s2.model.height) == (90, 16, 32)

    stores = {}
    for argv in readme_commands("vimpac", "tokenize"):
        stores[argv[argv.index("--out") + 1]] = argv
    sizes = {out: int(a[a.index("--size") + 1]) for out, a in stores.items()}
    assert sizes[s1.data.train_store] == 128 and sizes[s2.data.train_store] == 256
    rates = {d: load_config(["--config", str(REPO / f"configs/finetune.py:dataset={d}")]).data.clip_fps
             for d in ("ssv2", "diving48", "ucf101", "hmdb51", "k400")}
    assert set(rates.values()) == {2.0, 4.0}
    downstream = {out: a for out, a in stores.items() if "--variants" in a}
    assert downstream and any("ssv2" in out for out in downstream)
    for out, argv in downstream.items():
        fps = float(argv[argv.index("--fps") + 1])
        assert fps == 16 and all(fps % rate == 0 for rate in rates.values()), out  # the released 16-fps stores
        if "ssv2" in out:
            assert argv[argv.index("--variants") + 1] == "finetune_noflip"
