"""Config sweeps (`vimpac sweep`): expand a sweep file into runs, launch them, and summarise their
final metrics.

  spec.py       the combinators (sweep / product / zipit / chain, after big_vision's `hyper`),
                sweep files, their runs and `vimpac train` commands
  launchers.py  local (one after another), SLURM array job, TPU VM workers
  summary.py    summary.md / summary.csv / summary.png of a sweep's runs

A sweep file imports the combinators from here:

    from vimpac_jax.sweeps import chain, fixed, product, sweep, zipit
"""

from vimpac_jax.sweeps.launchers import (SLURM_GPU_SCRIPT, launcher_script, run_local, tpu_commands,
                                         write_slurm)
from vimpac_jax.sweeps.spec import (LOG_FILE, OVERRIDES_FILE, PARENT_PID_ENV, STATUS_FILE, Overrides, Run, chain,
                                    check_configs, config_flags, expand, fixed, format_value, load_sweep, product,
                                    short_name, split_base_config, sweep, train_command, validate_overrides,
                                    write_run_files, zipit)
from vimpac_jax.sweeps.summary import (MARKDOWN_METRICS, SUMMARY_PLOT, collect, plot_points, plot_summary,
                                       summary_csv, summary_markdown, write_summary)

__all__ = ['chain', 'check_configs', 'collect', 'config_flags', 'expand', 'fixed', 'format_value', 'launcher_script',
           'load_sweep', 'LOG_FILE', 'MARKDOWN_METRICS', 'Overrides', 'OVERRIDES_FILE', 'PARENT_PID_ENV',
           'plot_points', 'plot_summary', 'product', 'Run', 'run_local', 'short_name', 'SLURM_GPU_SCRIPT',
           'split_base_config', 'STATUS_FILE', 'summary_csv', 'summary_markdown', 'SUMMARY_PLOT', 'sweep',
           'tpu_commands', 'train_command', 'validate_overrides', 'write_run_files', 'write_slurm', 'write_summary',
           'zipit']
