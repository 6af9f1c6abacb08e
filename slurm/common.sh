#!/usr/bin/env bash
# Helpers shared by the sbatch scripts: GPU count, run dir, and the preemption/requeue wrapper.

# GPUs on this node: SLURM's allocation first, then what the driver sees, else 1 (CPU).
gpus_per_node() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "${SLURM_GPUS_ON_NODE}"
  elif command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L | wc -l
  else echo 1; fi
}

# The run dir the overrides select (the submitter exports it; otherwise ask the config).
resolve_run_dir() {
  if [ -n "${PIPELINE_RUN_DIR:-}" ]; then echo "${PIPELINE_RUN_DIR}"
  else "${PIPELINE_PYTHON:-python}" -m pipeline.slurm run-dir -- "$@"; fi
}

# Run a command (the srun step) so that a time-limit warning ends in a requeue, not a loss:
# SLURM signals this batch shell (--signal=B:USR1@...); we touch <run.dir>/.preempt, which
# every rank polls at each step, wait for the stage to save its checkpoint and exit, then
# requeue the job. The requeued job resumes from that checkpoint.
launch_with_requeue() {
  local run_dir="$1"; shift
  local flag="${run_dir}/.preempt"
  mkdir -p "${run_dir}"
  rm -f "${flag}"
  PREEMPTED=0
  trap 'PREEMPTED=1; echo "[slurm] preemption warning: asking the stage to checkpoint"; touch "${flag}"' USR1 TERM
  "$@" &
  local pid=$! rc=0
  while true; do
    wait "${pid}" && rc=0 || rc=$?
    kill -0 "${pid}" 2>/dev/null || break  # a trapped signal interrupts wait; the step still runs
  done
  trap - USR1 TERM
  rm -f "${flag}"
  if [ "${PREEMPTED}" = 1 ] || [ "${rc}" = 75 ]; then
    echo "[slurm] stage checkpointed (exit ${rc}); requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    return 0
  fi
  return "${rc}"
}
