"""The shell launchers (local multi-process, SLURM, TPU pods), installed as package data of
`vimpac_jax.launch`: `vimpac sweep --launcher slurm` runs each task through slurm_gpu.sbatch."""
