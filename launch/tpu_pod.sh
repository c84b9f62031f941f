#!/usr/bin/env bash
# Create (or reuse) a Cloud TPU VM slice, install this project on every worker, and run one
# command on all workers as one multi-process JAX run.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--accelerator-type v4-32] [--version tpu-ubuntu2204-base]
#                     [--project PROJECT] [--spot] [--no-install] [--port 8476] -- COMMAND [ARGS...]
#
# Steps: `gcloud compute tpus tpu-vm describe` (create the slice with `... create` when it does
# not exist); copy this checkout (git archive of HEAD plus uncommitted changes, as a tarball) to
# every worker and `pip install` it with jax[tpu]; then `gcloud ... ssh --worker=all` runs
# COMMAND on every worker with VIMPAC_COORDINATOR=<worker 0's internal IP>:PORT,
# VIMPAC_NUM_PROCESSES=<number of workers> and VIMPAC_PROCESS_ID=<the worker's number, from
# the VM metadata>. Paths in COMMAND are paths on the workers (use gs:// or a shared disk for
# data and workdirs).
#
# Example: launch/tpu_pod.sh --name vimpac-v4 --zone us-central2-b --accelerator-type v4-32 -- \
#   vimpac train --config configs/pretrain.py:base --config.data.train_store=/mnt/disks/data/tokens --workdir gs://b/run
set -euo pipefail

name="" zone="" project="" accel="v4-8" version="tpu-ubuntu2204-base" spot=0 install=1 port=8476
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator-type) accel="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --no-install) install=0; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (the command goes after --)" >&2; usage ;;
  esac
done
[[ -n "$name" && -n "$zone" ]] || { echo "tpu_pod.sh: --name and --zone are required" >&2; usage; }
[[ $# -gt 0 ]] || { echo "tpu_pod.sh: no command given after --" >&2; usage; }

where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
tpu() { gcloud compute tpus tpu-vm "$@"; }

if tpu describe "$name" "${where[@]}" --format='value(state)' >/dev/null 2>&1; then
  echo "tpu_pod.sh: using the existing TPU VM $name" >&2
else
  echo "tpu_pod.sh: creating TPU VM $name ($accel, $version)" >&2
  create=(create "$name" "${where[@]}" --accelerator-type="$accel" --version="$version")
  [[ $spot -eq 1 ]] && create+=(--spot)
  tpu "${create[@]}"
fi

# Worker 0's internal IP is the coordinator; the number of endpoints is the number of processes.
ips=$(tpu describe "$name" "${where[@]}" --format='value(networkEndpoints[].ipAddress)' | tr ';,' '  ')
read -r -a endpoints <<<"$ips"
[[ ${#endpoints[@]} -ge 1 ]] || { echo "tpu_pod.sh: $name reports no worker endpoints" >&2; exit 1; }
coordinator="${endpoints[0]}:${port}"

if [[ $install -eq 1 ]]; then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  tarball=$(mktemp -t vimpac_src.XXXXXX).tar.gz
  trap 'rm -f "$tarball"' EXIT
  # The working tree as it is (tracked and untracked, not ignored files), not only HEAD.
  (cd "$repo" && { git ls-files -co --exclude-standard 2>/dev/null || find . -type f -not -path './.git/*'; } \
     | while IFS= read -r f; do if [[ -f "$f" ]]; then printf '%s\n' "$f"; fi; done | tar -czf "$tarball" -T -)
  tpu scp "$tarball" "$name:vimpac_src.tar.gz" "${where[@]}" --worker=all
  tpu ssh "$name" "${where[@]}" --worker=all --command="rm -rf ~/vimpac && mkdir -p ~/vimpac && tar -xzf ~/vimpac_src.tar.gz -C ~/vimpac && python3 -m pip install -q -U 'jax[tpu]' -e ~/vimpac"
fi

printf -v cmd '%q ' "$@"
worker_id='${TPU_WORKER_ID:-$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)}'
remote="cd ~/vimpac && export VIMPAC_COORDINATOR=$coordinator VIMPAC_NUM_PROCESSES=${#endpoints[@]} VIMPAC_PROCESS_ID=$worker_id && export PATH=\$HOME/.local/bin:\$PATH && $cmd"
echo "tpu_pod.sh: running on ${#endpoints[@]} workers, coordinator $coordinator: $*" >&2
tpu ssh "$name" "${where[@]}" --worker=all --command="$remote"
