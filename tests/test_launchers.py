"""The launchers in launch/ with stand-in `gcloud`, `sbatch`, `srun` and `scontrol` on PATH.

The stand-ins (written into a temporary bin/ directory) record their argv to a log and, where
the real tool would start processes on hosts (srun, `gcloud ... ssh --worker=all`), start them
locally. The command they run is a tiny multi-process JAX program that joins the run through the
VIMPAC_* variables the launcher set (vimpac_jax.runtime.distributed.maybe_initialize) and
all-gathers the process ids over JAX's CPU collectives, so each test checks both what would be
sent and that the processes really form one run. Those runs (a launcher, its stand-ins and two
JAX processes) are end to end: slow. The launchers' refusals and failure handling run no JAX
and stay in the fast layer.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # a launcher that hangs fails the test

# Joins the run via VIMPAC_*; prints "RESULT <index> <count> <all indices gathered>".
PROGRAM = textwrap.dedent("""
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from vimpac_jax.runtime.distributed import maybe_initialize
    assert maybe_initialize(), "no VIMPAC_COORDINATOR in the environment"
    ids = multihost_utils.process_allgather(np.int32(jax.process_index()))
    import os, vimpac_jax
    # One write per line: both processes share the stand-in's stdout, and print's separate
    # writes of its arguments could interleave.
    os.write(1, f"RESULT {jax.process_index()} {jax.process_count()} {sorted(int(i) for i in ids)}\\n".encode())
    os.write(1, f"FROM {vimpac_jax.__file__}\\n".encode())
    # Neither leaves before both wrote: the coordinator (process 0) exiting first can end the
    # other before its write, under load (seen once in a fresh-clone CI run).
    multihost_utils.sync_global_devices("results written")
""")

# argv of every call goes to $STANDIN_LOG as one JSON line; helpers shared by the stand-ins.
_PRELUDE = textwrap.dedent("""\
    #!{python}
    import json, os, subprocess, sys
    with open(os.environ["STANDIN_LOG"], "a") as f:
        f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")

    def run_all(argvs_envs):
        procs = [subprocess.Popen(a, env=e, **kw) for a, e, kw in argvs_envs]
        codes = [p.wait() for p in procs]
        sys.exit(next((c for c in codes if c), 0))
""")

STANDINS = {
    # sbatch: runs the batch script at once, as the first node of a 2-node allocation would.
    "sbatch": """
        script, args = sys.argv[1], sys.argv[2:]
        env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01-02]",
                   SLURM_NTASKS=os.environ.get("STANDIN_NTASKS", "2"), SLURM_NTASKS_PER_NODE="1")
        sys.exit(subprocess.call(["bash", script] + args, env=env))
    """,
    # scontrol show hostnames: the first host must become the coordinator; the second is not this machine.
    "scontrol": """
        assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
        print("127.0.0.1\\n192.0.2.7")
    """,
    # srun [options] cmd...: SLURM_NTASKS copies of cmd with SLURM_PROCID / SLURM_LOCALID.
    "srun": """
        args = sys.argv[1:]
        while args and args[0].startswith("-"):
            args = args[1:]
        n = int(os.environ["SLURM_NTASKS"])
        run_all([(args, dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID="0"), {}) for i in range(n)])
    """,
    # gcloud compute tpus tpu-vm describe|create|scp|ssh with 2 workers "on" 127.0.0.1 and 192.0.2.8.
    "gcloud": """
        import tarfile
        root = os.environ["STANDIN_ROOT"]
        args = sys.argv[1:]
        assert args[:3] == ["compute", "tpus", "tpu-vm"], args
        verb, opts = args[3], args[4:]
        flag = lambda name: next((a.split("=", 1)[1] for a in opts if a.startswith(name + "=")), None)
        workers = [os.path.join(root, f"worker{i}") for i in range(2)]
        exists = os.path.exists(os.path.join(root, "created"))
        if verb == "describe":
            if not exists:
                sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
            print("127.0.0.1;192.0.2.8" if "networkEndpoints" in (flag("--format") or "") else "READY")
        elif verb == "create":
            open(os.path.join(root, "created"), "w").close()
        elif verb == "scp":
            assert flag("--worker") == "all", opts
            for w in workers:  # every worker's home receives the file
                os.makedirs(w, exist_ok=True)
                subprocess.check_call(["cp", opts[0], os.path.join(w, opts[1].split(":", 1)[1])])
        elif verb == "ssh":
            assert exists and flag("--worker") == "all", opts
            command = flag("--command")
            # Installing would pip-install into this interpreter: run everything but pip.
            command = command.replace("python3 -m pip install", "echo skipped pip install")
            run_all([(["bash", "-c", command], dict(os.environ, HOME=w, TPU_WORKER_ID=str(i)), {})
                     for i, w in enumerate(workers)])
        else:
            sys.exit(f"stand-in gcloud: unexpected {verb}")
    """,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def standins(tmp_path):
    """-> (env with the stand-ins first on PATH, path of the argv log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STANDINS.items():
        path = bin_dir / name
        path.write_text(_PRELUDE.format(python=sys.executable) + textwrap.dedent(body))
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIMPAC_", "SLURM_", "TPU_"))}
    env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}", STANDIN_LOG=str(log),
               STANDIN_ROOT=str(tmp_path), JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               VIMPAC_INIT_TIMEOUT="60", PYTHONPATH=str(REPO))
    return env, log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def results(stdout: str) -> list[str]:
    return sorted(line for line in stdout.splitlines() if line.startswith("RESULT"))


def run(args, env, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, args)), env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.slow
def test_local_runs_n_processes(standins):
    env, _ = standins
    out = run([REPO / "launch/local.sh", "-n", "2", "--cpu-devices", "2", "--", sys.executable, "-c", PROGRAM], env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert results(out.stdout) == ["RESULT 0 2 [0, 1]", "RESULT 1 2 [0, 1]"]


def test_local_propagates_a_failure_and_stops_the_rest(standins):
    env, _ = standins
    program = "import os, sys, time\nif os.environ['VIMPAC_PROCESS_ID'] == '1': sys.exit(3)\ntime.sleep(600)"
    out = run([REPO / "launch/local.sh", "-n", "2", "--", sys.executable, "-c", program], env)
    assert out.returncode == 3 and "exited with status 3" in out.stderr


@pytest.mark.slow
def test_slurm_sbatch(standins):
    env, log = standins
    env = dict(env, VIMPAC_PORT=str(free_port()))
    out = run(["sbatch", REPO / "launch/slurm_gpu.sbatch", sys.executable, "-c", PROGRAM], env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert results(out.stdout) == ["RESULT 0 2 [0, 1]", "RESULT 1 2 [0, 1]"]
    sent = calls(log)
    assert [c[0] for c in sent] == ["sbatch", "scontrol", "srun"]
    assert sent[1] == ["scontrol", "show", "hostnames", "node[01-02]"]
    srun = sent[2]
    assert "--kill-on-bad-exit=1" in srun and srun[-3:] == [sys.executable, "-c", PROGRAM]
    assert f"coordinator 127.0.0.1:{env['VIMPAC_PORT']}" in out.stderr


def test_slurm_sbatch_outside_an_allocation_fails(standins):
    env, _ = standins
    out = run(["bash", REPO / "launch/slurm_gpu.sbatch", "true"], env)
    assert out.returncode != 0 and "not inside a SLURM allocation" in out.stderr


@pytest.mark.slow
def test_tpu_pod_creates_installs_and_runs_on_all_workers(standins, tmp_path):
    env, log = standins
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # workers import the copy they received
    port = free_port()
    args = [REPO / "launch/tpu_pod.sh", "--name", "vimpac-v4", "--zone", "us-central2-b", "--accelerator-type", "v4-16",
            "--port", port, "--", "python3", "-c", PROGRAM]
    out = run(args, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert results(out.stdout) == ["RESULT 0 2 [0, 1]", "RESULT 1 2 [0, 1]"]
    verbs = [c[4] for c in calls(log)]
    assert verbs == ["describe", "create", "describe", "scp", "ssh", "ssh"]
    create = calls(log)[1]
    assert "vimpac-v4" in create and "--zone=us-central2-b" in create and "--accelerator-type=v4-16" in create
    install, launch = calls(log)[4], calls(log)[5]
    assert "--worker=all" in install and "pip install" in install[-1] and "-e ~/vimpac" in install[-1]
    assert f"VIMPAC_COORDINATOR=127.0.0.1:{port}" in launch[-1] and "VIMPAC_NUM_PROCESSES=2" in launch[-1]
    # Every worker received this checkout, and the program imported vimpac_jax from it.
    imported = sorted(line.split()[1] for line in out.stdout.splitlines() if line.startswith("FROM"))
    assert imported == [str(tmp_path / w / "vimpac" / "vimpac_jax" / "__init__.py") for w in ("worker0", "worker1")]
    for w in ("worker0", "worker1"):
        assert (tmp_path / w / "vimpac" / "vimpac_jax" / "runtime" / "distributed.py").is_file()
        assert (tmp_path / w / "vimpac" / "launch" / "tpu_pod.sh").is_file()

    # Second time: the slice exists, so it is reused, not created again, and the command runs on
    # every worker with the run's environment (joining the run was shown above: a program without
    # jax here, two interpreters' imports fewer).
    log.unlink()
    echo_env = "import os; os.write(1, 'ENV {VIMPAC_PROCESS_ID} {VIMPAC_NUM_PROCESSES} {VIMPAC_COORDINATOR}\\n'.format(**os.environ).encode())"
    out = run(args[:-4] + ["--no-install", "--", "python3", "-c", echo_env], env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [c[4] for c in calls(log)] == ["describe", "describe", "ssh"]
    assert sorted(line for line in out.stdout.splitlines() if line.startswith("ENV")) == [
        f"ENV {i} 2 127.0.0.1:{port}" for i in range(2)]
