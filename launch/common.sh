# Helpers shared by the launch scripts; sourced, not run.
#
# DRY_RUN=1 (or a script's --dry-run) prints each command, shell-quoted and
# prefixed with "+ ", instead of running it: check a launch before paying
# for it, or test the scripts without gcloud or ssh.
# shellcheck shell=bash

DRY_RUN="${DRY_RUN:-0}"

die() {
  echo "error: $*" >&2
  exit 2
}

# quote ARG...: the arguments as one string that a shell splits back into
# the same arguments: plain words as they are, others in single quotes.
quote() {
  local out="" arg q="'"
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
      out+=" ${arg}"
    else
      out+=" '${arg//${q}/${q}\\${q}${q}}'"
    fi
  done
  printf '%s' "${out# }"
}

# run CMD [ARG...]: runs the command, or prints it under DRY_RUN=1.
run() {
  if [[ "${DRY_RUN}" == "1" ]]; then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}

# The project's files for a copy to other machines: tracked and untracked
# files that git does not ignore (so uncommitted edits travel too).
pack_checkout() {
  local root="$1" archive="$2"
  if [[ "${DRY_RUN}" == "1" ]]; then
    echo "+ (cd ${root} && git ls-files -co --exclude-standard | tar czf ${archive} -T -)"
    return
  fi
  (cd "${root}" && git ls-files -co --exclude-standard | tar czf "${archive}" -T -)
}
