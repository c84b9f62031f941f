"""Exit codes of `vimpac train` (README, "Runs"), read by `vimpac sweep` and launch/*.sbatch.
BAD_INPUT is every command's code for input it refused (cli.py; export and convert too).

Only DONE means finished: a sweep runs every other run again, and `vimpac train` started again
in the same workdir resumes from its last checkpoint.
"""

DONE = 0
FAILED = 1  # an error during the run (e.g. metrics could not be written); resumes once fixed
BAD_INPUT = 2  # the config, the data or the workdir was rejected before training
NON_FINITE = 3  # a non-finite loss; the last checkpoint holds the last step before it
PREEMPTED = 75  # saved after SIGTERM/SIGINT: run it again to resume (sysexits.h EX_TEMPFAIL)
