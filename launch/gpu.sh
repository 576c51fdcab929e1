#!/usr/bin/env bash
# GPU machines: one node with all its GPUs, or several nodes as one JAX job.
#
#   launch/gpu.sh install [--hosts "h0 h1"] [--cuda cuda12]
#   launch/gpu.sh local -- --config=configs/sft_1p3b.py --workdir=/mnt/runs/s
#   launch/gpu.sh node --coordinator h0:8476 --num-nodes 2 --node-rank 1 -- ARGS
#   launch/gpu.sh ssh --hosts "h0 h1" [--port 8476] -- ARGS
#
# One process per node sees all of that node's GPUs. `node` sets
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
# instructrl/tools/distributed.py passes to jax.distributed.initialize; run it on
# every node with its own rank (rank 0 on the coordinator's host). `ssh`
# does exactly that from one machine, over ssh to each host in order, and
# waits for all of them. Under SLURM use launch/gpu.sbatch instead (jax
# reads SLURM's variables itself). The workdir must be shared by all nodes.
#
# The remote directory is REMOTE_DIR (default: this checkout's path, i.e. the
# same path on every host). DRY_RUN=1 or --dry-run prints the commands.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

main() {
  [[ $# -ge 1 ]] || usage
  local action="$1"
  shift
  local hosts="" coordinator="" nodes="" rank="" port=8476 cuda="cuda12"
  local remote="${REMOTE_DIR:-${ROOT}}"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --hosts) hosts="$2"; shift 2 ;;
      --coordinator) coordinator="$2"; shift 2 ;;
      --num-nodes) nodes="$2"; shift 2 ;;
      --node-rank) rank="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      --cuda) cuda="$2"; shift 2 ;;
      --remote-dir) remote="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; break ;;
      -h | --help) usage ;;
      *) die "unknown argument '$1' (see --help)" ;;
    esac
  done
  local -a host_list
  read -r -a host_list <<< "${hosts}"
  local py=(python3 -m instructrl.main)

  case "${action}" in
    install)
      local pip=(python3 -m pip install -q -e ".[data]" "jax[${cuda}]")
      if [[ ${#host_list[@]} -eq 0 ]]; then
        (cd "${ROOT}" && run "${pip[@]}")
        return
      fi
      local archive="/tmp/instructrl-gpu.tar.gz" host
      pack_checkout "${ROOT}" "${archive}"
      for host in "${host_list[@]}"; do
        run scp "${archive}" "${host}:/tmp/instructrl.tar.gz"
        run ssh "${host}" "mkdir -p ${remote} && tar xzf /tmp/instructrl.tar.gz -C \
${remote} && cd ${remote} && $(quote "${pip[@]}")"
      done
      ;;
    local)
      (cd "${ROOT}" && run "${py[@]}" "$@")
      ;;
    node)
      [[ -n "${coordinator}" && -n "${nodes}" && -n "${rank}" ]] ||
        die "node needs --coordinator HOST:PORT, --num-nodes N and --node-rank I"
      (cd "${ROOT}" && run env JAX_COORDINATOR_ADDRESS="${coordinator}" \
        JAX_NUM_PROCESSES="${nodes}" JAX_PROCESS_ID="${rank}" "${py[@]}" "$@")
      ;;
    ssh)
      [[ ${#host_list[@]} -ge 1 ]] || die "ssh needs --hosts \"h0 h1 ...\""
      local i pids=() status=0
      for i in "${!host_list[@]}"; do
        local cmd=(ssh "${host_list[i]}" "cd ${remote} && $(quote env \
          JAX_COORDINATOR_ADDRESS="${host_list[0]}:${port}" \
          JAX_NUM_PROCESSES="${#host_list[@]}" JAX_PROCESS_ID="${i}" \
          "${py[@]}" "$@")")
        if [[ "${DRY_RUN}" == 1 ]]; then
          run "${cmd[@]}"  # In order, so the printout is stable.
        else
          "${cmd[@]}" &
          pids+=($!)
        fi
      done
      for i in "${pids[@]}"; do
        wait "${i}" || status=$?
      done
      return "${status}"
      ;;
    *) die "unknown action '${action}': install, local, node or ssh" ;;
  esac
}

main "$@"
