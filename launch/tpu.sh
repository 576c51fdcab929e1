#!/usr/bin/env bash
# Cloud TPU VMs and pod slices: create one, install this checkout on every
# worker, run the same command on all workers, delete it.
#
#   launch/tpu.sh create  --name N --zone Z --type v5p-16 [--spot] [--queued]
#   launch/tpu.sh install --name N --zone Z
#   launch/tpu.sh run     --name N --zone Z [--detach] -- \
#       --config=configs/sft_1p3b.py --workdir=/mnt/runs/sft_1p3b
#   launch/tpu.sh ssh     --name N --zone Z -- nvidia-smi   # any command, all workers
#   launch/tpu.sh delete  --name N --zone Z
#
# `run` starts `python -m instructrl.main ARGS` on every worker at once; each
# worker is one JAX process and jax.distributed finds the others by itself
# (instructrl/tools/distributed.py). The workdir must be one directory that every
# worker sees (e.g. a Filestore or GCS FUSE mount): orbax writes each
# checkpoint cooperatively from all of them.
#
# Defaults come from the environment: TPU_NAME, ZONE, ACCELERATOR_TYPE,
# RUNTIME_VERSION, PROJECT, REMOTE_DIR (~/instructrl). DRY_RUN=1 or
# --dry-run prints the commands instead of running them.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

# The TPU VM image for an accelerator type (Cloud TPU's documented names).
runtime_for() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default runtime for accelerator type '$1'; pass --version" ;;
  esac
}

main() {
  [[ $# -ge 1 ]] || usage
  local action="$1"
  shift
  local name="${TPU_NAME:-}" zone="${ZONE:-}" type="${ACCELERATOR_TYPE:-}"
  local version="${RUNTIME_VERSION:-}" project="${PROJECT:-}"
  local remote="${REMOTE_DIR:-~/instructrl}" spot=0 queued=0 detach=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) name="$2"; shift 2 ;;
      --zone) zone="$2"; shift 2 ;;
      --type) type="$2"; shift 2 ;;
      --version) version="$2"; shift 2 ;;
      --project) project="$2"; shift 2 ;;
      --remote-dir) remote="$2"; shift 2 ;;
      --spot) spot=1; shift ;;
      --queued) queued=1; shift ;;
      --detach) detach=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; break ;;
      -h | --help) usage ;;
      *) die "unknown argument '$1' (see --help)" ;;
    esac
  done
  [[ -n "${name}" ]] || die "--name (or TPU_NAME) is required"
  [[ -n "${zone}" ]] || die "--zone (or ZONE) is required"
  local where=(--zone="${zone}")
  [[ -z "${project}" ]] || where+=(--project="${project}")
  local ssh=(gcloud compute tpus tpu-vm ssh "${name}" "${where[@]}" --worker=all)

  case "${action}" in
    create)
      [[ -n "${type}" ]] || die "--type (or ACCELERATOR_TYPE) is required, e.g. v5p-16"
      version="${version:-$(runtime_for "${type}")}"
      local extra=()
      [[ "${spot}" == 0 ]] || extra+=(--spot)
      if [[ "${queued}" == 1 ]]; then
        # Large slices are granted through queued resources.
        run gcloud compute tpus queued-resources create "${name}" --node-id="${name}" \
          "${where[@]}" --accelerator-type="${type}" --runtime-version="${version}" \
          "${extra[@]}"
      else
        run gcloud compute tpus tpu-vm create "${name}" "${where[@]}" \
          --accelerator-type="${type}" --version="${version}" "${extra[@]}"
      fi
      ;;
    install)
      local archive="/tmp/instructrl-${name}.tar.gz"
      pack_checkout "${ROOT}" "${archive}"
      run gcloud compute tpus tpu-vm scp "${archive}" "${name}:/tmp/instructrl.tar.gz" \
        "${where[@]}" --worker=all
      run "${ssh[@]}" --command="mkdir -p ${remote} && tar xzf /tmp/instructrl.tar.gz \
-C ${remote} && cd ${remote} && python3 -m pip install -q -e '.[tpu,data]'"
      ;;
    run)
      [[ $# -ge 1 ]] || die "run needs the instructrl.main arguments after --"
      local cmd
      cmd="cd ${remote} && python3 -m instructrl.main $(quote "$@")"
      if [[ "${detach}" == 1 ]]; then
        # Survives a dropped ssh session; read ~/instructrl.log on each worker.
        cmd="nohup bash -c $(quote "${cmd}") > ~/instructrl.log 2>&1 &"
      fi
      run "${ssh[@]}" --command="${cmd}"
      ;;
    ssh)
      [[ $# -ge 1 ]] || die "ssh needs a command after --"
      run "${ssh[@]}" --command="$(quote "$@")"
      ;;
    delete)
      if [[ "${queued}" == 1 ]]; then
        run gcloud compute tpus queued-resources delete "${name}" "${where[@]}" \
          --force --quiet
      else
        run gcloud compute tpus tpu-vm delete "${name}" "${where[@]}" --quiet
      fi
      ;;
    *) die "unknown action '${action}': create, install, run, ssh or delete" ;;
  esac
}

main "$@"
