"""`vimpac compile`: the slice names, and deviceless TPU compiles of the runlocal configs (the `tpu`
extra: libtpu) for a one-host and a two-host slice, on the run's mesh; a batch that cannot fit
is one "does not fit" line and exit 1."""

import importlib.util

import pytest

from tests.conftest import run_cli, run_vimpac
from vimpac_jax.aot import chips
from vimpac_jax.aot import compile as aot

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]'; .ci/run installs it)")


@pytest.mark.parametrize("name, topology, num_chips, hosts", [
    ("v5p-8", "v5:2x2x1", 4, 1),      # v5p-N counts TensorCores: 2 per chip
    ("v5p-32", "v5:2x2x4", 16, 4),
    ("v5p-128", "v5:4x4x4", 64, 16),
    ("v4-32", "v4:2x2x4", 16, 4),
    ("v5e-1", "v5e:1x1", 1, 1),       # v5e-N counts chips
    ("v5e-8", "v5e:2x4", 8, 2),
    ("v5e-64", "v5e:8x8", 64, 16),
    ("v6e-256", "v6e:16x16", 256, 64),
    ("v5p:2x2x2", "v5:2x2x2", 8, 2),  # topology strings, with Cloud's or libtpu's prefix
    ("v5e:2x2", "v5e:2x2", 4, 1),
])
def test_slice_names(name, topology, num_chips, hosts):
    s = chips.parse_slice(name)
    assert (s.topology, s.chips, s.hosts) == (topology, num_chips, hosts)


@pytest.mark.parametrize("name, message", [
    ("v7-8", "unknown TPU generation 'v7'"),
    ("v5p-6", "power-of-two"),
    ("v5p-3", "2 per chip"),
    ("v5e:2x2x1", "2 dimensions"),
    ("tpu", "expected a Cloud TPU name"),
])
def test_bad_slice_names(name, message):
    with pytest.raises(ValueError, match=message):
        chips.parse_slice(name)


def test_clock_from_the_bf16_peak():
    # v4's 1.05 GHz is the published figure (Jouppi et al., ISCA 2023); the others follow from
    # their pages' peak and MXUs the same way.
    assert chips.GENERATIONS["v4"].clock_hz == pytest.approx(1.05e9, rel=0.002)
    assert chips.GENERATIONS["v5e"].clock_hz == pytest.approx(1.5e9, rel=0.003)


def test_optimal_seconds_note_names_the_custom_calls():
    assert aot.optimal_seconds_note(0.25, 0) == "XLA's optimal_seconds 0.25 s"
    note = aot.optimal_seconds_note(-21.999544, 22)
    assert "-21.9995 s (not used" in note and "22 in the ENTRY computation" in note


def test_missing_libtpu_is_one_line(monkeypatch):
    monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
    with pytest.raises(ValueError, match=r"needs libtpu, which is not installed: pip install 'vimpac-jax\[tpu\]'"):
        aot.require_libtpu()


def _compile(config_args, topology, programs=None):
    from vimpac_jax.config_utils import load_config

    config = load_config(["--config"] + config_args)
    target = aot.tpu_target(topology)
    mesh, reports = aot.compile_run(config, target, programs=programs)
    return target, mesh, reports


# The whole train + evaluate programs of a run compiled for TPU slices: the slow layer. The
# runlocal configs (one layer, configs/common.py): the compile, the mesh, the memory report and
# the estimate are the same code for any depth, and libtpu's compile time grows with the layers
# (the pre-training step: 16 s of CPU at one layer, 26 s at two). In the
# fast layer, test_finetune_evaluate_one_host compiles one program through the same compile_run
# and report, test_slice_names the topologies and hosts, test_clock_from_the_bf16_peak the estimate's
# clock, test_find_batch_searches_each_remat_policy_and_keeps_the_best the search, and
# test_cli_bad_topology_is_one_line the command's CLI.
@pytest.mark.slow
@needs_libtpu
def test_pretrain_one_host():
    target, mesh, reports = _compile(["configs/pretrain.py:runlocal"], "v5e:2x2")
    assert (len(target.devices), target.processes, target.device_kind) == (4, 1, "TPU v5 lite")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 1}
    assert [r.name for r in reports] == ["train", "evaluate"]
    for r in reports:
        assert r.fits and 0 < r.total_bytes < 16 * 2 ** 30 and r.xla_flops > 0
    train = reports[0]
    assert train.clips == 8 and train.required_flops_per_device > 0
    # The estimate: the ENTRY instructions' cycles at v5e's clock, and what follows from it.
    assert train.estimated_cycles > 0 and train.estimate_s == train.estimated_cycles / 1.50299072265625e9
    assert train.clips_per_s_per_device == pytest.approx(2 / train.estimate_s)
    assert train.peak_fraction == pytest.approx(train.required_flops_per_device / train.estimate_s / 197e12)
    # The rbg dropout RNG brings custom-calls (X64Combine) without an estimate: counted, named.
    assert train.unestimated_custom_calls > 0 and "custom-calls and custom fusions without an estimate count 0" in train.estimate_method


@pytest.mark.slow
@needs_libtpu
def test_finetune_two_hosts_fsdp():
    # v5e-8: 2x4 chips on two hosts of 2x2; the run's mesh with fsdp=2 spans both hosts.
    target, mesh, reports = _compile(["configs/finetune.py:runlocal", "--config.mesh.fsdp=2",
                                      "--config.data.batch_size=8"], "v5e-8", programs=("train",))
    assert (len(target.devices), target.processes) == (8, 2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    (train,) = reports
    assert train.fits and train.clips == 8 and train.argument_bytes > 0


@needs_libtpu
def test_finetune_evaluate_one_host():
    # The multi-view test: eval_batch_size 4 videos x 2 clips x 3 crops on a 2x2 slice.
    _, mesh, reports = _compile(["configs/finetune.py:runlocal"], "v5e-4", programs=("evaluate",))
    (evaluate,) = reports
    assert evaluate.fits and evaluate.clips == 4 * 2 * 3


@pytest.mark.slow
@needs_libtpu
def test_cli_impossible_batch_does_not_fit(tmp_path, capsys):
    # In process (test_cli_bad_topology_is_one_line is the command's smoke test in a process of its own).
    out = tmp_path / "compile.json"
    code, stdout, stderr = run_cli(capsys, "compile", "--config", "configs/finetune.py:runlocal", "--topology", "v5e-4",
                                   "--config.data.batch_size=4194304", "--programs", "train", "--json", out)
    assert code == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "vimpac compile: train: does not fit: needs" in stderr
    assert "GiB of 15.75 GiB per chip" in stderr or "GiB of 16.00 GiB per chip" in stderr
    assert "mesh: data=4 fsdp=1 tensor=1" in stdout


@pytest.mark.slow  # a `vimpac` process: the command's smoke test
def test_cli_bad_topology_is_one_line():
    r = run_vimpac("compile", "--config", "configs/pretrain.py:runlocal", "--topology", "v9-8", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("vimpac compile: error: --topology v9-8: unknown TPU generation")


def test_no_topology_without_gpus_is_one_line(capsys):
    from vimpac_jax import cli

    assert cli.main(["compile", "--config", "configs/pretrain.py:runlocal"]) == 2
    assert "vimpac compile: error: no GPUs here (jax's devices are cpu): give --topology" in capsys.readouterr().err


@pytest.mark.parametrize("limit, maximum, expected", [(0, 64, 0), (1, 64, 1), (37, 64, 37), (64, 64, 64),
                                                      (1000, 64, 64), (5, 6, 5)])
def test_largest_fitting_batch_search(limit, maximum, expected):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= limit

    assert aot.largest_fitting(fits, maximum) == expected
    assert max(calls) <= maximum and len(calls) <= 2 * maximum.bit_length() + 1


def test_find_batch_searches_each_remat_policy_and_keeps_the_best(monkeypatch):
    """`--find-batch --remat a,b,...`: the largest per-chip batch for each policy, and the policy
    that fits the largest one kept (the first listed on a tie). The compiles are replaced by a
    memory model (per-clip bytes by policy) so the search's logic is what is tested."""
    import types

    from vimpac_jax.commands import compile as compile_cmd
    from vimpac_jax.configs import pretrain

    per_video = {"none": 5, "dots_no_batch": 3, "full": 3, "save:qkv,attention": 4}  # GiB per video per chip
    chips = 4

    def fake_compile_run(config, target, programs=None):
        per_chip = config.data.batch_size // (chips * config.pretrain.micro_batches)
        need = per_video[config.model.remat] * per_chip
        return None, [aot.ProgramReport(name="train", batch="", clips=0, fits=need <= 16, total_bytes=need << 30,
                                        message="" if need <= 16 else f"needs {need} GiB of 16")]

    monkeypatch.setattr(compile_cmd.aot, "compile_run", fake_compile_run)
    config = pretrain.get_config("small,runlocal")
    target = types.SimpleNamespace(devices=[None] * chips)
    policies = compile_cmd._remat_policies("none, dots_no_batch,full,save:qkv,attention")
    assert policies == ["none", "dots_no_batch", "full", "save:qkv,attention"]
    found, trials, per_policy = compile_cmd._find_batch_and_remat(config, target, 64, policies, lambda line: None)
    assert per_policy == {"none": 3, "dots_no_batch": 5, "full": 5, "save:qkv,attention": 4}
    assert found == 5 and config.model.remat == "dots_no_batch"  # the tie with full: the first listed
    assert [b for b, _ in trials] == [1, 2, 4, 8, 6, 5] and all(r.fits == (b <= 5) for b, r in trials)


def test_cli_remat_without_find_batch_or_with_a_bad_policy_is_one_line(capsys):
    from vimpac_jax.commands import compile as compile_cmd

    assert compile_cmd.main(["--config", "configs/pretrain.py:runlocal", "--remat", "full"]) == 2
    assert "--remat takes policies" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model.remat must be one of"):
        compile_cmd.main(["--config", "configs/pretrain.py:runlocal", "--find-batch", "--remat", "none,everything"])


def test_fine_tuning_programs_accumulate_as_the_run_does():
    """The fine-tuning step compiled is the run's: with finetune.videos_per_device (the Large-Half
    preset's 2, the released --bs-per-gpu) the update is accumulated over batch / (devices x 2)
    micro-batches, in the task and in `vimpac compile` alike (tasks.finetune.finetune_micro_batches);
    --find-batch then searches that per-device count."""
    import types

    from vimpac_jax.commands import compile as compile_cmd
    from vimpac_jax.configs import finetune
    from vimpac_jax.tasks.finetune import finetune_micro_batches

    config = finetune.get_config("dataset=ucf101,model=large_half")
    assert int(config.finetune.videos_per_device) == 2 and config.data.batch_size == 128
    assert finetune_micro_batches(config, 16) == 4 and finetune_micro_batches(config, 64) == 1
    with pytest.raises(ValueError, match="videos_per_device=2 on 48 data x fsdp devices does not divide"):
        finetune_micro_batches(config, 48)
    target = types.SimpleNamespace(devices=[None] * 16)
    assert compile_cmd._searched_batch_size(config, target, 3) == 48 and config.finetune.videos_per_device == 3
    config.finetune.videos_per_device = 0
    config.finetune.micro_batches = 2
    assert compile_cmd._searched_batch_size(config, target, 3) == 96 and finetune_micro_batches(config, 16) == 2
