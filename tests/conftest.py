"""Shared test set-up: 8 CPU devices, the golden outputs of the released code, the `vimpac`
runner, scheduling.

Layers: `pytest -m "not slow"` is the fast layer, unit and parity tests in process; tests marked
`slow` (markers in pyproject.toml) run a training run, a whole chain or a real program end to
end, in process where a subprocess adds nothing; a few need processes of their own: several
processes (`test_multihost.py`: 2 processes x 4 devices), a signal or SIGKILL in the middle of a
run, a fresh interpreter (a clean import, an installed copy), and one CLI smoke test per command.
The README's command runs every layer.

Devices: each test process (the pytest process, or each xdist worker) has 8 CPU devices, as
big_vision's tests have (`chex.set_n_cpu_devices(8)`), so mesh and sharding tests run in process
(`test_pretrain_step.py`'s meshes, the 1-process run of `test_multihost.py`). A test that means
one device says so: `jax.devices()[:1]` where it builds the mesh, fixture `one_device` (or
`one_device_module`) where it runs a whole program written for one device. The subprocesses
the tests start get the environment without the device count (1 device, as a user's run,
unless the test adds it to XLA_FLAGS itself).
"""

import atexit
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest

# One persistent compilation cache for the session's subprocesses: the many `vimpac train` runs
# of the same tiny configs (train, sweep, multi-host tests) compile once. A new directory per
# session (removed at its end by the process that made it), so nothing carries over between runs.
# Entries are shared only between processes with the same devices: jax's key holds the CPU
# topology, so a program compiled in a 1-device subprocess serves the 1-device subprocesses. The
# test processes themselves do not use it (pytest_configure): they compile ~2,700 programs, most
# of them tiny and their own, and computing each one's key and writing it cost more than the few
# shared ones save (measured with jax 0.10.2: the fast layer 240 -> 230 s of CPU, the whole
# suite 741 -> 718 s).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vimpac-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# The suite's programs are tiny, so compiling is most of their time on CPU: XLA's backend (LLVM)
# optimisation off compiles in about 30% less CPU time (measured on test_step_traffic,
# test_finetune, test_vq) and changes no result beyond float rounding. Read by jax when it is
# imported, here and in every subprocess; JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns it back on.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# XLA's CPU compiler with its earlier fusion emitters instead of the MLIR ones (its default): the
# tiny programs compile in about a third less CPU time (measured with jax 0.10.2: the runlocal
# pre-training step 10.6 -> 7.3 s of CPU; test_sweep's `vimpac train` runs 76 -> 52 s), with the
# same results up to float rounding. For the test processes and every subprocess they start (their
# XLA_FLAGS); flags already set come after it, so theirs win. The golden parity's ill-conditioned
# train-mode outputs are compiled with LLVM optimisation (OPTIMIZED below), as a user's program
# is (test_golden_parity.train_mode): with both settings of the suite their float32 rounding
# moves past the golden's tolerance. (XLA aborts on a flag it does not know: if a later jaxlib drops
# this one, drop it here.)
SUITE_XLA_FLAGS = " ".join(filter(None, ["--xla_cpu_use_fusion_emitters=false", os.environ.get("XLA_FLAGS")]))


def xla_flags_with_cpu_devices(count: int) -> str:
    """XLA_FLAGS for a process with `count` CPU devices: the suite's flags and the device count."""
    return f"{SUITE_XLA_FLAGS} --xla_force_host_platform_device_count={count}"


# 8 CPU devices for this process: XLA reads XLA_FLAGS when jax creates its CPU backend (the first
# jax.devices() or computation), so it is set here, before any test module's jax import (the last
# of a repeated flag wins). `eight_cpu_devices` below creates the backend and sets SUITE_XLA_FLAGS
# alone for subprocesses.
DEVICE_COUNT = 8
_XLA_FLAGS_BEFORE = os.environ.get("XLA_FLAGS")
os.environ["XLA_FLAGS"] = xla_flags_with_cpu_devices(DEVICE_COUNT)

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("VIMPAC_GOLDEN", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session", autouse=True)
def eight_cpu_devices():
    """Creates jax's backend with the 8 devices, then leaves SUITE_XLA_FLAGS alone in XLA_FLAGS, so
    the programs the tests start (`run_vimpac`, drivers, launchers) run on 1 device as a user's run
    does, unless a test gives them devices itself. Session-wide and autouse: first, before any module fixture."""
    import jax

    devices = jax.devices()
    assert len(devices) == DEVICE_COUNT and devices[0].platform == "cpu", (
        f"the tests run on {DEVICE_COUNT} CPU devices (XLA_FLAGS={os.environ['XLA_FLAGS']!r}; on a host with "
        f"accelerators set JAX_PLATFORMS=cpu), got {devices}")
    os.environ["XLA_FLAGS"] = SUITE_XLA_FLAGS
    return devices


def pytest_configure(config):
    """Under xdist (`-n N`) this process only hands out tests: it gives its workers, which load
    this file themselves, the environment as it found it. A process that runs tests compiles
    without the persistent cache (see JAX_COMPILATION_CACHE_DIR above); its subprocesses use it."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        if _XLA_FLAGS_BEFORE is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = _XLA_FLAGS_BEFORE
        return
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    # Python's full (generation 2) collections, 10x less often: each one walks the whole heap of a
    # test process, which grows to millions of objects (jax's caches of its ~1,000 compiled
    # programs and their traces), and they took ~15 of the fast layer's ~245 s of CPU (29 and 24
    # in the two workers, 0.26 s each; measured with jax 0.10.2). Young generations as Python's
    # default; the peak memory of test_model.py is unchanged (2.2 GB).
    gc.set_threshold(700, 10, 100)


@contextlib.contextmanager
def first_device_only():
    """The process's first device as its only one, for a whole program written for one device (the
    training loop, a command, the demo chain): the library takes every device of the process
    (`sharding.make_mesh`, the tokenizer, `predict`) and has no option to choose them, so
    jax.devices(), jax.local_devices() and their counts give the first device while it is active."""
    import jax

    devices, local_devices = jax.devices, jax.local_devices
    with mock.patch.object(jax, "devices", lambda *a, **k: devices(*a, **k)[:1]), \
            mock.patch.object(jax, "local_devices", lambda *a, **k: local_devices(*a, **k)[:1]), \
            mock.patch.object(jax, "device_count", lambda *a, **k: 1), \
            mock.patch.object(jax, "local_device_count", lambda *a, **k: 1):
        yield


@pytest.fixture
def one_device():
    """`first_device_only` for one test."""
    with first_device_only():
        yield


@pytest.fixture(scope="module")
def one_device_module():
    """`first_device_only` for a module whose module fixtures run programs too (use with
    `pytestmark = pytest.mark.usefixtures("one_device_module")`)."""
    with first_device_only():
        yield


# compiler_options for one program (`jax.jit(f, compiler_options=OPTIMIZED)`) that must be
# compiled with XLA CPU's LLVM optimisation despite the suite's settings above: one that runs many
# times, or whose float32 rounding must be a user's. Level 1 rounds as XLA's default level 2 does
# on the golden batch (test_golden_parity.train_mode) and compiles in half the CPU time.
OPTIMIZED = {"xla_backend_optimization_level": 1}


@pytest.fixture
def xla_optimized():
    """XLA's backend optimisation on (see JAX_DISABLE_MOST_OPTIMIZATIONS above) for the programs
    compiled during one test, for the few whose run time, not compile time, dominates (large
    sampled batches): unoptimised code runs those several times slower."""
    import jax

    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, name="tmpfs") -> a new directory with a tmpfs of `size` (mount's syntax: "64k",
    "12m") mounted on it: a small disk that really fills (ENOSPC from the kernel). Root only: the
    test is skipped where mounting is not allowed. Unmounted after the test."""
    mounted = []

    def mount(size: str, name: str = "tmpfs") -> Path:
        point = tmp_path / name
        point.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (not root)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"golden outputs not found at {GOLDEN} (set VIMPAC_GOLDEN)")
        pytest.skip(f"golden outputs not found at {GOLDEN} (set VIMPAC_GOLDEN)")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_tokenizer(golden_dir, tmp_path_factory) -> Path:
    """The tiny DALL-E golden pickles converted once per session (a tokenizer directory)."""
    from vimpac_jax.conversion import dalle as dalle_conversion

    src = golden_dir / "dalle_tiny"
    dst = tmp_path_factory.mktemp("tokenizer") / "dalle_tiny"
    rc = dalle_conversion.main(["--encoder", str(src / "encoder.pkl"), "--decoder", str(src / "decoder.pkl"), str(dst)])
    assert rc == 0
    return dst


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`vimpac ARGS` in this process (`cli.main`: no start-up, the command's own error lines and
    exit code): (exit code, stdout, stderr). For tests of a command's behaviour; `run_vimpac`
    where the test needs the program itself (its process, a signal, the installed entry point)."""
    from vimpac_jax import cli

    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_vimpac(*args, env=None, cwd=REPO, check=False, timeout=None, background=False):
    """`python -m vimpac_jax ARGS` in a fresh process that imports this checkout's package.

    env: the child's environment (default: ours); PYTHONPATH gets this checkout first either way,
    so a run from another `cwd` tests this code, not an installed copy. Returns the
    CompletedProcess (text stdout/stderr); check=True fails the test with the end of stderr
    on a nonzero exit; background=True returns the started Popen instead (pipes open).
    """
    env = dict(os.environ if env is None else env)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    argv = [sys.executable, "-m", "vimpac_jax", *map(str, args)]
    if background:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


# ------------------------------------------------------------------------------------------------
# Scheduling under pytest-xdist (`-n 2`).

# Modules whose tests share no expensive module fixture (theirs write a few small token stores):
# each test is a work unit of its own, so their end-to-end runs spread over both workers.
# test_multihost.py is not one: its SIGTERM test and its 2-vs-1 test share one 2-process run (a
# module fixture).
INDEPENDENT_TESTS = {"test_train.py", "test_sweep.py"}


def work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: its module, or the test itself in INDEPENDENT_TESTS."""
    module = nodeid.split("::", 1)[0]
    return nodeid if Path(module).name in INDEPENDENT_TESTS else module


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent under `-p no:xdist`
def pytest_xdist_make_scheduler(config, log):
    """Send each work unit (`work_unit`) to one worker unless `--dist` is given.

    xdist's default (`load`) deals a module's tests out to all workers in pairs, so every worker
    built the module's fixtures again: the demo chain, the trained tokenizer, the 8-device step
    workers, the training stores. Whole modules build each of them once.
    """
    if any(arg == "-d" or arg.startswith("--dist") for arg in config.invocation_params.args):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the order of pytest_collection_modifyitems below
    return WorkUnitScheduling(config, log)


# Expected seconds per test (tests of a second or more; setup, call and teardown, fixtures built
# on the way included), from a run of the whole suite under `-n 2` with `--record-durations`:
# only the order in which work units go to the workers depends on it.
DURATIONS = Path(__file__).with_name("durations.json")
UNRECORDED_SECONDS = {True: 10.0, False: 0.3}  # a test not in DURATIONS: slow, or not


def pytest_addoption(parser):
    parser.addoption("--record-durations", metavar="FILE", default=None,
                     help="write each test's seconds (setup + call + teardown; those of 1 s or more) to "
                          "FILE as JSON, as tests/durations.json holds them")


_durations: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Adds up each test's phases (under xdist the workers' reports reach this process)."""
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    path = session.config.getoption("--record-durations")
    if path and not hasattr(session.config, "workerinput"):
        recorded = {nodeid: round(seconds, 1) for nodeid, seconds in sorted(_durations.items()) if seconds >= 1.0}
        Path(path).write_text(json.dumps(recorded, indent=0) + "\n")


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselected: the order of what runs
def pytest_collection_modifyitems(config, items):
    """Under xdist, the work units expected to take longest first (DURATIONS), each unit's tests
    in file order.

    Longest first keeps the two workers busy to the end instead of one finishing a long module
    alone (the longest-processing-time rule); units stay contiguous so no module fixture is built
    twice.
    """
    if not hasattr(config, "workerinput"):  # a plain `pytest` run keeps the file order
        return
    recorded = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}

    def expected_seconds(item) -> float:
        return recorded.get(item.nodeid, UNRECORDED_SECONDS[item.get_closest_marker("slow") is not None])

    units = {}
    for item in items:
        units.setdefault(work_unit(item.nodeid), []).append(item)
    cost = {name: sum(map(expected_seconds, group)) for name, group in units.items()}
    order = sorted(units, key=lambda name: -cost[name])  # stable: file order among equals
    items[:] = [item for name in order for item in units[name]]
