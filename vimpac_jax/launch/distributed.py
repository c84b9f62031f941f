"""Multi-process start-up: JAX's distributed runtime when a command runs as one process per host.

Cloud TPU VMs and SLURM are detected by `jax.distributed.initialize()` itself; explicit settings
come from the environment (VIMPAC_COORDINATOR=host:port, VIMPAC_NUM_PROCESSES, VIMPAC_PROCESS_ID),
which the launchers in launch/ set. A single process on one machine initialises nothing.
"""

import os


def maybe_initialize() -> bool:
    """Initialise jax.distributed when this process is one of several; True if it did."""
    import jax

    coordinator = os.environ.get("VIMPAC_COORDINATOR")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["VIMPAC_NUM_PROCESSES"]),
            process_id=int(os.environ["VIMPAC_PROCESS_ID"]),
            initialization_timeout=int(os.environ.get("VIMPAC_INIT_TIMEOUT", "300")),
        )
        return True
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
        return True
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        jax.distributed.initialize()
        return True
    return False
