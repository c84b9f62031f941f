"""Multi-process start-up: JAX's distributed runtime when a command runs as one process per host.

Every multi-process command (`vimpac train`, `evaluate`, `tokenize`, `features`) calls
`maybe_initialize()` before it touches a device. Where its settings come from, first match wins:

  explicit   VIMPAC_COORDINATOR=host:port, VIMPAC_NUM_PROCESSES=N, VIMPAC_PROCESS_ID=i
             (set by launch/local.sh, launch/slurm_gpu.sbatch, launch/tpu_pod.sh, or by hand);
  SLURM      SLURM_JOB_ID with SLURM_NTASKS > 1: jax.distributed detects coordinator and ids;
  Cloud TPU  TPU_WORKER_HOSTNAMES naming several workers: likewise detected by JAX.

A single process on one machine initialises nothing. VIMPAC_INIT_TIMEOUT (seconds, default
300) bounds the wait for the coordinator and the other processes.

A misconfigured launch fails instead of hanging:
  - bad or missing VIMPAC_* values: a clear error before anything starts;
  - a coordinator that cannot be reached: processes other than 0 poll its TCP port themselves
    first and fail with an error naming it (JAX's own failure is an abort with a generic gRPC
    message, which Python cannot catch); if the run still does not form (process 0 waiting for
    processes that never come), a watchdog prints what was expected just before JAX aborts;
  - hosts with different configs: `check_same_config` (called by the training program before
    anything is compiled) compares a hash of the resolved config over all processes.

A stop signal that reaches one host is shared through the same runtime: `announce_preemption`
starts JAX's preemption sync protocol (`multihost_utils.reached_preemption_sync_point`), which
gives every process the same step to stop at without a device collective per step.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Mapping, Optional

DEFAULT_INIT_TIMEOUT = 300
_HOST_BYTES = 64  # hostnames are exchanged as fixed-size byte rows


class DistributedSetupError(RuntimeError):
    """The multi-process launch is misconfigured (settings, coordinator, or differing hosts)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins a multi-process run. coordinator/num_processes/process_id are
    None when JAX detects them itself (SLURM, Cloud TPU)."""

    source: str  # "env", "slurm" or "tpu"
    coordinator: Optional[str]
    num_processes: Optional[int]
    process_id: Optional[int]
    timeout: int

    def describe(self) -> str:
        if self.source != "env":
            return f"{self.source} auto-detection"
        return f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator}"


def _int_env(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None or value.strip() == "":
        raise DistributedSetupError(f"VIMPAC_COORDINATOR is set, so {name} must be set too")
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"{name}={value!r} is not an integer") from None


def split_address(address: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port); DistributedSetupError if malformed."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedSetupError(f"VIMPAC_COORDINATOR={address!r} must be HOST:PORT (e.g. 10.0.0.2:8476)")
    return host, int(port)


def settings_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Settings]:
    """The multi-process settings of this process, or None for a single-process run.

    Pure (reads only `environ`, default os.environ): validates the explicit VIMPAC_* values.
    """
    environ = os.environ if environ is None else environ
    timeout_text = environ.get("VIMPAC_INIT_TIMEOUT", str(DEFAULT_INIT_TIMEOUT))
    try:
        timeout = int(timeout_text)
    except ValueError:
        raise DistributedSetupError(f"VIMPAC_INIT_TIMEOUT={timeout_text!r} is not a whole number of seconds") from None
    if timeout < 1:
        raise DistributedSetupError(f"VIMPAC_INIT_TIMEOUT={timeout} must be >= 1 second")
    coordinator = environ.get("VIMPAC_COORDINATOR", "").strip()
    if coordinator:
        split_address(coordinator)
        num = _int_env(environ, "VIMPAC_NUM_PROCESSES")
        pid = _int_env(environ, "VIMPAC_PROCESS_ID")
        if num < 1 or not 0 <= pid < num:
            raise DistributedSetupError(f"need 0 <= VIMPAC_PROCESS_ID < VIMPAC_NUM_PROCESSES, got {pid} and {num}")
        return Settings("env", coordinator, num, pid, timeout)
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return Settings("slurm", None, None, None, timeout)
    if environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        return Settings("tpu", None, None, None, timeout)
    return None


def wait_for_port(address: str, timeout: float, *, interval: float = 0.25) -> bool:
    """True once a TCP connection to `address` succeeds, False after `timeout` seconds."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(min(interval * 4, timeout), 0.1)):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)


def _watchdog(settings: Settings, seconds: float) -> threading.Timer:
    """Prints what was expected if initialize() has not returned after `seconds` (JAX then
    aborts the process with a gRPC DEADLINE_EXCEEDED that names neither)."""

    def report():
        print(f"vimpac: error: the multi-process run did not form within {settings.timeout} s "
              f"(VIMPAC_INIT_TIMEOUT) for {settings.describe()}: check that all processes were started with the "
              f"same VIMPAC_COORDINATOR and VIMPAC_NUM_PROCESSES, distinct VIMPAC_PROCESS_ID, and that the "
              f"coordinator's port is reachable; JAX will now abort this process", file=sys.stderr, flush=True)

    timer = threading.Timer(seconds, report)
    timer.daemon = True
    return timer


def _use_gloo_on_cpu() -> None:
    """CPU multi-process needs a CPU collectives implementation (gloo); it only takes effect for
    the CPU backend, and must be set before the backend starts. JAX_CPU_COLLECTIVES_IMPLEMENTATION wins."""
    import jax

    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ and \
            "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(settings: Settings) -> None:
    """jax.distributed.initialize with `settings`; DistributedSetupError if the coordinator
    cannot be reached by a process other than 0."""
    import jax

    _use_gloo_on_cpu()
    timeout = settings.timeout
    if settings.source == "env" and settings.process_id != 0:
        start = time.monotonic()
        if not wait_for_port(settings.coordinator, timeout):
            raise DistributedSetupError(
                f"{settings.describe()}: cannot reach the coordinator {settings.coordinator} within {timeout} s "
                f"(VIMPAC_INIT_TIMEOUT); is process 0 running on that host, and is the port open?")
        timeout = max(int(timeout - (time.monotonic() - start)), 1)
    watchdog = _watchdog(settings, max(timeout - 1.0, timeout * 0.9))
    watchdog.start()
    try:
        if settings.source == "env":
            jax.distributed.initialize(coordinator_address=settings.coordinator,
                                       num_processes=settings.num_processes, process_id=settings.process_id,
                                       initialization_timeout=timeout)
        else:
            jax.distributed.initialize(initialization_timeout=timeout)
    finally:
        watchdog.cancel()


def maybe_initialize() -> bool:
    """Initialise jax.distributed when this process is one of several; True if it did.

    For commands: a misconfiguration prints `vimpac: error: ...` and exits with status 2.
    """
    try:
        settings = settings_from_env()
        if settings is None:
            return False
        initialize(settings)
    except DistributedSetupError as e:
        print(f"vimpac: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return True


def config_digest(config: Any) -> bytes:
    """SHA-256 of the resolved config (an ml_collections ConfigDict or a plain dict) as canonical JSON."""
    if hasattr(config, "to_json_best_effort"):
        data = json.loads(config.to_json_best_effort())
    else:
        data = config
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=repr).encode()).digest()


def differing_processes(digests: list[bytes]) -> list[int]:
    """Indices of the processes whose digest differs from process 0's."""
    return [i for i, d in enumerate(digests) if d != digests[0]]


def check_same_config(config: Any) -> None:
    """Raises ValueError naming the hosts whose resolved config differs from process 0's.

    Collective: every process must call it (before anything that compiles or exchanges data,
    where a differing config would otherwise hang or silently train different models).
    """
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    host = socket.gethostname().encode()[:_HOST_BYTES].ljust(_HOST_BYTES, b"\0")
    row = np.frombuffer(config_digest(config) + host, dtype=np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row))  # [P, 32 + 64]
    digests = [bytes(r[:32]) for r in rows]
    hosts = [bytes(r[32:]).rstrip(b"\0").decode(errors="replace") for r in rows]
    bad = differing_processes(digests)
    if bad:
        names = ", ".join(f"process {i} on {hosts[i]}" for i in bad)
        raise ValueError(f"the resolved config differs between hosts: {names} differ from process 0 on {hosts[0]}; "
                         f"start every process with the same --config and --config.FIELD overrides")


# The coordination service's key under which XLA's SIGTERM notifier announces a preemption to
# every process, its value the death time in absl's RFC 3339 format (kPreemptionNoticeKey in
# xla/tsl/distributed_runtime/preemption/preemption_sync_manager.cc). Every process's
# preemption sync manager waits on it; once it is set they agree on the step to stop at (one
# past the furthest process's last `reached_preemption_sync_point` call, found over the
# coordination service, not the devices).
PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


def announce_preemption() -> bool:
    """Starts JAX's preemption sync protocol on every process of the run, as XLA's own SIGTERM
    notifier would; False when this process is not part of a multi-process run.

    The training loop takes SIGTERM and SIGINT in Python (so that a second signal stops at once
    and Ctrl-C is a stop too), which replaces the C++ handler that XLA's notifier installs in
    `jax.distributed.initialize`; this hands the first signal on to the protocol instead. The
    death time is now: the protocol starts at once (it waits only for a later death time).
    """
    from jax._src import distributed as jax_distributed  # the runtime's client, as orbax's multihost reads it

    client = jax_distributed.global_state.client
    if client is None:
        return False
    death_time = datetime.datetime.now(datetime.timezone.utc).isoformat()  # 2026-01-02T03:04:05.678901+00:00
    client.key_value_set(PREEMPTION_NOTICE_KEY, death_time, allow_overwrite=True)  # several hosts may announce
    return True
