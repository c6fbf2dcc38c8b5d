#!/usr/bin/env bash
# Test-only system packages: Debian's Slurm (slurmctld, slurmd, sbatch, ...) and munge, for
# tests/test_slurm.py's real one-node cluster. Idempotent and quiet; needs root (CI runs as
# root). The test skips itself, saying why, when these are missing.
set -euo pipefail
have_all() {
  for program in munged slurmctld slurmd sbatch squeue scontrol scancel sinfo; do
    command -v "$program" >/dev/null 2>&1 || [ -x "/usr/sbin/$program" ] || return 1
  done
}
if have_all; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "slurm-setup: not root; install slurm-wlm and munge yourself to run the Slurm test" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "slurm-setup: no apt-get here; install slurm-wlm and munge to run the Slurm test" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq slurm-wlm munge >/dev/null
have_all
echo "slurm-setup: installed $(slurmctld -V) and $(munged -V 2>&1 | head -n1)"
