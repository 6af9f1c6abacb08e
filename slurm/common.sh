#!/usr/bin/env bash
# Helpers shared by the sbatch scripts: GPU count, run dir, TRL's vLLM server, and the
# preemption/requeue wrapper.

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

# Does the job need TRL's vLLM server, and how do the server and the trainers share the GPUs?
# The config decides (python -m pipeline.slurm vllm-server, which exits 2 on settings it cannot
# serve); its key=value lines become VLLM_SERVER (0/1), VLLM_URL, VLLM_SERVER_DEVICES,
# VLLM_TRAIN_DEVICES, VLLM_TRAIN_GPUS, VLLM_TRAIN_NODES, VLLM_TRAIN_MACHINES,
# VLLM_TRAIN_PROCESSES, VLLM_NOTE and the array VLLM_COMMAND.
#   plan_vllm_server [--nodes h1,h2,...] -- <hydra overrides>
plan_vllm_server() {
  local plan key value
  plan="$("${PIPELINE_PYTHON:-python}" -m pipeline.slurm vllm-server --gpus "$(gpus_per_node)" \
    --visible "${CUDA_VISIBLE_DEVICES:-}" "$@")" || return $?
  VLLM_SERVER=0 VLLM_COMMAND=()
  while IFS='=' read -r key value; do
    case "${key}" in
      server) VLLM_SERVER="${value}" ;;
      url) VLLM_URL="${value}" ;;
      server_devices) VLLM_SERVER_DEVICES="${value}" ;;
      train_devices) VLLM_TRAIN_DEVICES="${value}" ;;
      train_gpus) VLLM_TRAIN_GPUS="${value}" ;;
      train_nodes) VLLM_TRAIN_NODES="${value}" ;;
      train_machines) VLLM_TRAIN_MACHINES="${value}" ;;
      train_processes) VLLM_TRAIN_PROCESSES="${value}" ;;
      note) VLLM_NOTE="${value}" ;;
      command) VLLM_COMMAND+=("${value}") ;;
    esac
  done <<< "${plan}"
}

# Start the planned server in the background on VLLM_SERVER_DEVICES, in a process group of its
# own (stop_vllm_server takes its workers too), logging to <run dir>/vllm-server-<job id>.log.
start_vllm_server() {
  local log="$1/vllm-server-${SLURM_JOB_ID:-local}.log"
  mkdir -p "$1"
  echo "[slurm] ${VLLM_NOTE}; log ${log}"
  echo "[slurm] CUDA_VISIBLE_DEVICES=${VLLM_SERVER_DEVICES} ${VLLM_COMMAND[*]}"
  CUDA_VISIBLE_DEVICES="${VLLM_SERVER_DEVICES}" setsid "${VLLM_COMMAND[@]}" >> "${log}" 2>&1 &
  VLLM_SERVER_PID=$!
  trap stop_vllm_server EXIT
}

# Stop the server (no-op without one): TERM to its group, KILL after VLLM_STOP_TIMEOUT (30) seconds.
stop_vllm_server() {
  [ -n "${VLLM_SERVER_PID:-}" ] || return 0
  local pid="${VLLM_SERVER_PID}" i
  VLLM_SERVER_PID=""
  echo "[slurm] stopping the vLLM server"
  kill -TERM -- "-${pid}" 2>/dev/null
  for ((i = 0; i < ${VLLM_STOP_TIMEOUT:-30} * 10; i++)); do
    case "$(ps -o stat= -p "${pid}" 2>/dev/null)" in ""|Z*) break ;; esac  # gone, or exited (a zombie)
    sleep 0.1
  done
  kill -KILL -- "-${pid}" 2>/dev/null  # the server, or workers that outlived it
  wait "${pid}" 2>/dev/null
  return 0
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
  stop_vllm_server  # the stage is over: free the server's GPUs before any requeue
  if [ "${PREEMPTED}" = 1 ] || [ "${rc}" = 75 ]; then
    echo "[slurm] stage checkpointed (exit ${rc}); requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    return 0
  fi
  return "${rc}"
}
