"""The exit codes of `batchgen run`, defined once: the data-parallel launcher combines its
workers' codes and the Slurm script requeues a task on EXIT_INTERRUPTED, so every module must
agree on them. No imports, so any module can use it without an import cycle."""

EXIT_OK = 0  # done, or nothing left to do
EXIT_INTERNAL = 1
EXIT_CONFIG = 2  # a configuration mistake, found before any work
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped with its complete parts committed; re-run to resume
