#!/usr/bin/env bash
# One zerolm job on a Cloud TPU VM slice (or several slices), driven through gcloud.
#
#   launch/tpu_vm.sh create --name=NAME --zone=ZONE --accelerator_type=v4-32 [--spot|--reserved]
#   launch/tpu_vm.sh setup  --name=NAME --zone=ZONE [--ref=GIT_REF]
#   launch/tpu_vm.sh run    --name=NAME --zone=ZONE -- --config=experiments/wmt_ende.py:big \
#                           --workdir=gs://BUCKET/wmt_big [--config.x=y ...]
#   launch/tpu_vm.sh logs   --name=NAME --zone=ZONE
#   launch/tpu_vm.sh stop   --name=NAME --zone=ZONE      # SIGTERM: every process saves, then exits
#   launch/tpu_vm.sh delete --name=NAME --zone=ZONE
#
# Every subcommand takes --help and --dry_run (print the exact gcloud commands, run nothing).
# Multi-slice: --slices=N on create (and on every later subcommand) asks for N slices of the
# accelerator type as one queued resource (nodes NAME-0 ... NAME-N-1); pass
# --config.mesh.dcn_data=N to the run so that the `data` axis spans the slices (DCN) and fsdp /
# tensor stay inside a slice (ICI). The workdir must be on storage every host sees (GCS).
set -euo pipefail

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Flags:
  --name=NAME                the queued resource and TPU VM name (required)
  --zone=ZONE                e.g. us-central2-b (required)
  --project=PROJECT          default: gcloud's configured project
  --accelerator_type=TYPE    create: v4-32, v5litepod-16, v5p-64, ...
  --runtime_version=VERSION  create: default by type (v4: tpu-ubuntu2204-base,
                             v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5)
  --spot | --reserved        create: capacity kind (default on-demand)
  --slices=N                 multi-slice: N slices (default 1)
  --ref=GIT_REF              setup: check this ref out of the repository's origin instead of
                             copying the local working tree
  --dry_run                  print the gcloud commands, run nothing
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
command=$1
shift
case $command in
  create | setup | run | logs | stop | delete) ;;
  -h | --help | help) usage; exit 0 ;;
  *) die "unknown subcommand '$command'; use create, setup, run, logs, stop or delete" ;;
esac

name="" zone="" project="" accelerator="" runtime="" capacity="" slices=1 ref="" dry_run=0
job_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator_type=*) accelerator=${1#*=} ;;
    --runtime_version=*) runtime=${1#*=} ;;
    --spot) capacity=--spot ;;
    --reserved) capacity=--reserved ;;
    --slices=*) slices=${1#*=} ;;
    --ref=*) ref=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; job_args=("$@"); break ;;
    *) die "unknown flag '$1' for $command; see launch/tpu_vm.sh --help" ;;
  esac
  shift
done
[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
[[ $slices =~ ^[1-9][0-9]*$ ]] || die "--slices=$slices: a positive integer"

common=(--zone="$zone")
[[ -z $project ]] || common+=(--project="$project")

# Prints a command (shell-quoted) with --dry_run, else runs it.
call() {
  if ((dry_run)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

nodes() {  # the TPU VM names of the job
  if ((slices == 1)); then echo "$name"; else for ((i = 0; i < slices; i++)); do echo "$name-$i"; done; fi
}

on_all_workers() {  # COMMAND on every worker of every slice
  local node
  for node in $(nodes); do
    call gcloud compute tpus tpu-vm ssh "$node" "${common[@]}" --worker=all --command="$1"
  done
}

root=$(cd "$(dirname "$0")/.." && pwd)
remote_dir="zerolm"
case $command in
  create)
    [[ -n $accelerator ]] || die "--accelerator_type is required for create, e.g. v4-32"
    if [[ -z $runtime ]]; then
      case $accelerator in
        v4-*) runtime=tpu-ubuntu2204-base ;;
        v5litepod-* | v5e-*) runtime=v2-alpha-tpuv5-lite ;;
        v5p-*) runtime=v2-alpha-tpuv5 ;;
        *) die "--runtime_version: no default for '$accelerator'; name one" ;;
      esac
    fi
    target=(--node-id="$name")
    ((slices == 1)) || target=(--node-count="$slices" --node-prefix="$name")
    args=("${target[@]}" "${common[@]}" --accelerator-type="$accelerator" --runtime-version="$runtime")
    [[ -z $capacity ]] || args+=("$capacity")
    call gcloud compute tpus queued-resources create "$name" "${args[@]}"
    ;;
  setup)
    if [[ -n $ref ]]; then
      origin=$(git -C "$root" remote get-url origin 2>/dev/null) ||
        die "setup --ref: this checkout has no git remote 'origin' to clone on the workers"
      fetch="rm -rf $remote_dir && git clone --quiet $origin $remote_dir && git -C $remote_dir checkout --quiet $ref"
      on_all_workers "$fetch"
    else
      archive=/tmp/zerolm-$name.tar.gz
      call tar -czf "$archive" -C "$root" --exclude=.git --exclude=.venv --exclude=runs .
      for node in $(nodes); do
        call gcloud compute tpus tpu-vm scp "$archive" "$node:~/zerolm.tar.gz" "${common[@]}" --worker=all
      done
      on_all_workers "rm -rf $remote_dir && mkdir $remote_dir && tar -xzf zerolm.tar.gz -C $remote_dir"
    fi
    on_all_workers "cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]' && .venv/bin/pip install -q --no-deps -e . && .venv/bin/pip install -q gcsfs google-cloud-storage"
    ;;
  run)
    [[ ${#job_args[@]} -gt 0 ]] || die "run: give the job's flags after --, e.g. -- --config=experiments/demo.py --workdir=gs://BUCKET/demo"
    quoted=$(printf '%q ' "${job_args[@]}")
    job="cd $remote_dir && mkdir -p logs && nohup .venv/bin/python -m experiments.run ${quoted}--distributed > logs/worker_\$(hostname).log 2>&1 &"
    on_all_workers "$job"
    ;;
  logs)
    on_all_workers "tail -n 50 $remote_dir/logs/worker_\$(hostname).log"
    ;;
  stop)
    on_all_workers "pkill -TERM -f 'experiments.run' || true"
    ;;
  delete)
    call gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
    ;;
esac
