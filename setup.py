"""Which files install where (the metadata is in pyproject.toml).

The repository keeps the config files and the shell launchers at its top level (`configs/`,
`launch/`, where the README's commands name them); they install inside the package as
`vimpac_jax.configs` and `vimpac_jax.launch`, so an installed `vimpac` finds them without a
checkout (`vimpac_jax.config_utils.resolve_config_path`, `vimpac_jax.sweeps.launcher_script`).
setuptools' `package_dir` maps the two packages onto those directories, for wheels and editable
installs alike; the package list is found here, not listed in pyproject.toml, so a new
subpackage of vimpac_jax/ installs without an edit.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["vimpac_jax", "vimpac_jax.*"]),
              "vimpac_jax.configs", *(f"vimpac_jax.configs.{p}" for p in find_packages("configs")),
              "vimpac_jax.launch"],
    package_dir={"vimpac_jax.configs": "configs", "vimpac_jax.launch": "launch"},
    package_data={"vimpac_jax.launch": ["*.sh", "*.sbatch"]},
)
