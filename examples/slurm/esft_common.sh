# shellcheck shell=bash
# The one place where the ESFT pipeline's commands are assembled (sourced by the esft_*.sbatch scripts).
#
# A model script sets its defaults (MODEL_NAME, TP/EP/PP, batch sizes, ...) and calls `esft_main`. Every setting can be
# overridden from the environment at submit time, e.g. `TRAIN_ITERS=200 LR=3e-5 sbatch examples/slurm/...`.
# DRY_RUN=1 prints each command (one line, shell-quoted, prefixed with "+ ") instead of running it; nothing is created.
#
# Stages (STAGES, space-separated, in this order); a stage whose output already exists is skipped, so a requeued job
# continues where it stopped:
#   convert  HF checkpoint -> Megatron-Core base checkpoint        skip if $BASE_CKPT has a tracker file
#   collect  routing statistics of the base model on the task data skip if $SCORES_DIR/scores.json exists
#   select   expert config (Token p=0.2 by default)                skip if $EXPERT_CONFIG exists
#   train    ESFT fine-tuning                                      resumes from $SAVE_DIR when it has a tracker file
#   export   ESFT adapter (expert_cfg.json + safetensors)          skip if $ADAPTER_DIR/expert_cfg.json exists
#   to_hf    full HF checkpoint with the trained experts merged    skip if $HF_OUT_DIR/config.json exists
#
# Requeue: the sbatch headers ask for `--requeue` and `--signal=B:USR1@<sec>`. On USR1 (time limit near) the handler
# stops the running step with SIGTERM (pretrain_esft.py --exit-signal-handler then saves if it can before torchrun's
# kill) and requeues the job; checkpoints are written atomically every $SAVE_INTERVAL iterations, so the requeued job
# resumes from the newest complete one (`--load $SAVE_DIR`). EXIT_DURATION_MINS (Megatron-LM's
# --exit-duration-in-mins) makes training save and stop by itself that many minutes after it started; the job is then
# requeued to continue, and nothing since the last checkpoint is lost. Its default, `auto`, is the job's time left
# when training starts (squeue's %L) minus EXIT_MARGIN_MINS; `EXIT_DURATION_MINS=` (empty) turns it off.

TRACKER_FILE=latest_checkpointed_iteration.txt  # Megatron-LM's tracker, written last by megatron_esft saves

esft_log() { echo "[esft $(date +%H:%M:%S)] $*" >&2; }

esft_die() { echo "error: $*" >&2; exit 2; }

# ---- settings ------------------------------------------------------------------------------------------------------
esft_settings() {
    : "${ESFT_REPO:?ESFT_REPO must point at the megatron_esft checkout}"
    : "${HF_MODEL:?set HF_MODEL to the HF checkpoint directory (config.json, safetensors, tokenizer)}"
    : "${TRAIN_DATA:?set TRAIN_DATA to the task training JSONL (messages format)}"
    # one path, several, or a weighted blend "1 task.jsonl 1 alignment.jsonl" (pretrain_esft.py --train-data)
    read -ra TRAIN_DATA_ARGS <<<"$TRAIN_DATA"
    PYTHON=${PYTHON:-python}
    WORK_DIR=${WORK_DIR:-$ESFT_REPO/runs/$MODEL_NAME-$TASK}
    BASE_CKPT=${BASE_CKPT:-$WORK_DIR/base_mcore}
    SCORES_DIR=${SCORES_DIR:-$WORK_DIR/expert_scores}
    EXPERT_CONFIG=${EXPERT_CONFIG:-$WORK_DIR/expert_config.json}
    SAVE_DIR=${SAVE_DIR:-$WORK_DIR/checkpoints}
    TENSORBOARD_DIR=${TENSORBOARD_DIR:-$WORK_DIR/tensorboard}
    ADAPTER_DIR=${ADAPTER_DIR:-$WORK_DIR/adapter}
    HF_OUT_DIR=${HF_OUT_DIR:-$WORK_DIR/hf_merged}
    TOKENIZER=${TOKENIZER:-$HF_MODEL}
    STAGES=${STAGES:-convert collect select train export to_hf}
    if [ -z "${SCORE_DATA:-}" ]; then
        # experts are scored on the task data alone: a blend does not say which of its sources that is
        [[ ${TRAIN_DATA_ARGS[0]} =~ ^[0-9.eE+-]+$ ]] && esft_has_stage collect &&
            esft_die "TRAIN_DATA is a weighted blend ($TRAIN_DATA): set SCORE_DATA to the task data to score experts on"
        SCORE_DATA=$TRAIN_DATA
    fi
    SCORE_METHOD=${SCORE_METHOD:-token}
    TOP_P=${TOP_P:-$([ "$SCORE_METHOD" = gate ] && echo 0.1 || echo 0.2)}  # the paper's thresholds
    SCORE_TOKENS=${SCORE_TOKENS:-131072}                                       # 32 x 4096, the paper's sample
    MASTER_PORT=${MASTER_PORT:-29500}
    EXIT_DURATION_MINS=${EXIT_DURATION_MINS-auto}  # set but empty: off
    EXIT_MARGIN_MINS=${EXIT_MARGIN_MINS:-20}         # > the USR1 lead time + one checkpoint save
}

# ---- cluster geometry ----------------------------------------------------------------------------------------------
esft_cluster() {
    NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    JOB_ID=${SLURM_JOB_ID:-local}
    if [ -z "${MASTER_ADDR:-}" ]; then
        if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
            # the first host of the allocation runs the c10d rendezvous store. No `| head -n 1`: with pipefail, head
            # closing the pipe early can kill scontrol with SIGPIPE on a long node list and abort the job.
            local hosts
            hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
            MASTER_ADDR=${hosts%%$'\n'*}
        else
            MASTER_ADDR=localhost
        fi
    fi
    [ -n "$MASTER_ADDR" ] || esft_die "could not determine MASTER_ADDR from SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
    local model_parallel=$((TP * PP))
    ((WORLD_SIZE % model_parallel == 0)) || esft_die "world size $WORLD_SIZE is not divisible by TP*PP=$model_parallel"
    local data_parallel=$((WORLD_SIZE / model_parallel))
    # Megatron-Core's expert grid: EP * expert-TP * expert-DP = world size, with expert-TP = TP by default
    ((WORLD_SIZE % (EP * TP * PP) == 0)) || esft_die "world size $WORLD_SIZE is not divisible by EP*TP*PP=$((EP * TP * PP))"
    ((GLOBAL_BATCH_SIZE % (MICRO_BATCH_SIZE * data_parallel) == 0)) ||
        esft_die "GLOBAL_BATCH_SIZE=$GLOBAL_BATCH_SIZE is not a multiple of MICRO_BATCH_SIZE*DP=$((MICRO_BATCH_SIZE * data_parallel))"
    export MASTER_ADDR MASTER_PORT
    # since Slurm 22.05 srun no longer inherits --cpus-per-task from the batch job; pass it on explicitly
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron's TP/SP comm-compute ordering
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
}

# ---- launchers -----------------------------------------------------------------------------------------------------
# One torchrun per node (srun), GPUS_PER_NODE workers each; c10d rendezvous on the first node.
esft_distributed_launcher() {
    LAUNCH=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
    # shellcheck disable=SC2206  # SRUN_ARGS is a user-given word list, e.g. "--container-image=... --mpi=none"
    [ -n "${SRUN_ARGS:-}" ] && LAUNCH+=($SRUN_ARGS)
    LAUNCH+=(torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE"
        --rdzv-id="$JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT")
}

# A single process on the first node, for the conversion / selection / export tools.
esft_single_launcher() {
    LAUNCH=(srun --nodes=1 --ntasks=1 --ntasks-per-node=1)
    # shellcheck disable=SC2206
    [ -n "${SRUN_ARGS:-}" ] && LAUNCH+=($SRUN_ARGS)
    LAUNCH+=("$PYTHON")
}

esft_parallel_args() {
    PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --expert-model-parallel-size "$EP"
        --pipeline-model-parallel-size "$PP")
    # uneven pipeline stages (e.g. DeepSeek-V3's 61 layers): the other stages split the remaining layers evenly
    [ -n "${PP_FIRST_LAYERS:-}" ] && PARALLEL_ARGS+=(--decoder-first-pipeline-num-layers "$PP_FIRST_LAYERS")
    [ -n "${PP_LAST_LAYERS:-}" ] && PARALLEL_ARGS+=(--decoder-last-pipeline-num-layers "$PP_LAST_LAYERS")
    return 0
}

# ---- resume --------------------------------------------------------------------------------------------------------
# Prints the checkpoint to --load: our own save dir once it holds a complete checkpoint, else the converted base.
esft_resume_dir() {
    if [ -f "$SAVE_DIR/$TRACKER_FILE" ]; then echo "$SAVE_DIR"; else echo "$BASE_CKPT"; fi
}

# The iteration of the newest complete checkpoint in $SAVE_DIR (0 if none).
esft_saved_iteration() {
    local iteration=0
    [ -f "$SAVE_DIR/$TRACKER_FILE" ] && iteration=$(tr -d '[:space:]' <"$SAVE_DIR/$TRACKER_FILE")
    case "$iteration" in '' | *[!0-9]*) iteration=0 ;; esac
    echo "$((10#$iteration))"
}

esft_train_args() {
    esft_parallel_args
    TRAIN_ARGS=("$ESFT_REPO/pretrain_esft.py"
        --load "$(esft_resume_dir)" --save "$SAVE_DIR"
        --train-data "${TRAIN_DATA_ARGS[@]}" --tokenizer "$TOKENIZER")
    if [ "${FINETUNE_MODE:-esft}" = full ]; then
        TRAIN_ARGS+=(--finetune-mode full)
    else
        TRAIN_ARGS+=(--expert-config "$EXPERT_CONFIG")
    fi
    TRAIN_ARGS+=(--train-iters "$TRAIN_ITERS" --micro-batch-size "$MICRO_BATCH_SIZE"
        --global-batch-size "$GLOBAL_BATCH_SIZE" --seq-length "$SEQ_LENGTH" --lr "$LR"
        --weight-decay "$WEIGHT_DECAY" --seed "$SEED" --save-interval "$SAVE_INTERVAL"
        --log-interval "$LOG_INTERVAL" --tensorboard-dir "$TENSORBOARD_DIR"
        "${PARALLEL_ARGS[@]}")
    # save on SIGTERM (the USR1 handler's, scancel's, preemption's) when the save fits before the step is killed
    TRAIN_ARGS+=(--exit-signal-handler)
    local exit_minutes=$EXIT_DURATION_MINS
    if [ "$exit_minutes" = auto ]; then
        exit_minutes=$(esft_job_minutes_left)
        if [ -n "$exit_minutes" ] && ((exit_minutes > EXIT_MARGIN_MINS)); then
            exit_minutes=$((exit_minutes - EXIT_MARGIN_MINS))
        else
            esft_log "EXIT_DURATION_MINS=auto: no time limit known" \
                "(or <= EXIT_MARGIN_MINS=$EXIT_MARGIN_MINS min left); not set"
            exit_minutes=
        fi
    fi
    [ -n "$exit_minutes" ] && TRAIN_ARGS+=(--exit-duration-in-mins "$exit_minutes")
    # shellcheck disable=SC2206  # extra pretrain_esft.py flags as a word list
    [ -n "${EXTRA_TRAIN_ARGS:-}" ] && TRAIN_ARGS+=($EXTRA_TRAIN_ARGS)
    return 0
}

# ---- running -------------------------------------------------------------------------------------------------------
CHILD_PID=

# srun forwards SIGTERM to every task (torchrun passes it on to its workers); the step's exit status is expected to be
# non-zero here, so it must not trip `set -e`.
esft_stop_child() {
    if [ -n "$CHILD_PID" ]; then
        kill -TERM "$CHILD_PID" 2>/dev/null || true
        wait "$CHILD_PID" 2>/dev/null || true
        CHILD_PID=
    fi
}

# USR1 from `#SBATCH --signal=B:USR1@N`: stop the running step, requeue. TERM (scancel, preemption): stop and exit.
esft_on_usr1() {
    esft_log "time limit near: stopping the running step and requeueing job $JOB_ID"
    esft_stop_child
    scontrol requeue "$JOB_ID"
    exit 0
}

esft_on_term() {
    esft_log "SIGTERM: stopping the running step"
    esft_stop_child
    exit 143
}

# Runs (or, with DRY_RUN=1, prints) one command. The command runs in the background and the shell waits for it, so
# bash delivers a trapped signal immediately instead of after the step ends.
esft_run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    "$@" &
    CHILD_PID=$!
    local status=0
    wait "$CHILD_PID" || status=$?
    CHILD_PID=
    return "$status"
}

# Whole minutes left in this job from squeue's %L ([days-]hours:minutes:seconds or minutes:seconds); nothing when
# there is no limit (UNLIMITED), no Slurm job, or no answer.
esft_job_minutes_left() {
    [ "$JOB_ID" = local ] && return 0
    local left days=0 hours=0 minutes seconds
    left=$(squeue -h -j "$JOB_ID" -o %L 2>/dev/null) || return 0
    case "$left" in *-*) days=${left%%-*} left=${left#*-} ;; esac
    case "$left" in
        *:*:*) IFS=: read -r hours minutes seconds <<<"$left" ;;
        *:*) IFS=: read -r minutes seconds <<<"$left" ;;
        *) return 0 ;;
    esac
    local part
    for part in "$days" "$hours" "$minutes" "$seconds"; do
        case "$part" in '' | *[!0-9]*) return 0 ;; esac
    done
    echo $((((10#$days * 24) + 10#$hours) * 60 + 10#$minutes))
}

# Training that exited cleanly before TRAIN_ITERS (EXIT_DURATION_MINS, or an --exit-interval in EXTRA_TRAIN_ARGS)
# must not go on to the export stages: requeue the job, which resumes from the checkpoint just saved.
esft_continue_unfinished_training() {
    [ "${DRY_RUN:-0}" = 1 ] && return 0
    local before=$1 now
    now=$(esft_saved_iteration)
    ((now >= TRAIN_ITERS)) && return 0
    ((now > before)) || esft_die "training exited at iteration $now of $TRAIN_ITERS without saving a new checkpoint"
    if [ "$JOB_ID" = local ]; then
        esft_log "stage train: stopped at iteration $now of $TRAIN_ITERS; run the script again to continue"
    else
        esft_log "stage train: stopped at iteration $now of $TRAIN_ITERS; requeueing job $JOB_ID to continue"
        scontrol requeue "$JOB_ID"
    fi
    exit 0
}

esft_has_stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

esft_stage() {  # esft_stage NAME SKIP_IF_EXISTS -- command...
    local name=$1 done_marker=$2
    shift 3
    esft_has_stage "$name" || return 0
    if [ -e "$done_marker" ]; then
        esft_log "stage $name: $done_marker exists, skipping"
        return 0
    fi
    esft_log "stage $name"
    esft_run "$@"
}

esft_main() {
    esft_settings
    esft_cluster
    esft_parallel_args
    if [ "${DRY_RUN:-0}" != 1 ]; then
        mkdir -p "$WORK_DIR" "$TENSORBOARD_DIR"
        trap esft_on_usr1 USR1
        trap esft_on_term TERM
    fi
    esft_log "job $JOB_ID: $NNODES node(s) x $GPUS_PER_NODE GPU(s), TP=$TP EP=$EP PP=$PP, master $MASTER_ADDR:$MASTER_PORT"
    local tools=$ESFT_REPO/tools

    esft_single_launcher
    esft_stage convert "$BASE_CKPT/$TRACKER_FILE" -- "${LAUNCH[@]}" "$tools/convert_hf_to_mcore.py" \
        --hf "$HF_MODEL" --out "$BASE_CKPT"

    esft_distributed_launcher
    esft_stage collect "$SCORES_DIR/scores.json" -- "${LAUNCH[@]}" "$tools/collect_expert_scores.py" \
        --load "$BASE_CKPT" --data "$SCORE_DATA" --tokenizer "$TOKENIZER" --out "$SCORES_DIR" \
        --max-tokens "$SCORE_TOKENS" "${PARALLEL_ARGS[@]}"

    esft_single_launcher
    esft_stage select "$EXPERT_CONFIG" -- "${LAUNCH[@]}" "$tools/select_experts.py" \
        --scores "$SCORES_DIR" --method "$SCORE_METHOD" --top-p "$TOP_P" --out "$EXPERT_CONFIG"

    if esft_has_stage train && (($(esft_saved_iteration) >= TRAIN_ITERS)); then
        esft_log "stage train: $SAVE_DIR is at iteration $(esft_saved_iteration) >= $TRAIN_ITERS, skipping"
    elif esft_has_stage train; then
        esft_distributed_launcher
        esft_train_args
        esft_log "stage train: --load $(esft_resume_dir)"
        local before
        before=$(esft_saved_iteration)
        esft_run "${LAUNCH[@]}" "${TRAIN_ARGS[@]}"
        esft_continue_unfinished_training "$before"
    fi

    esft_single_launcher
    esft_stage export "$ADAPTER_DIR/expert_cfg.json" -- "${LAUNCH[@]}" "$tools/export_esft.py" \
        --load "$SAVE_DIR" --out "$ADAPTER_DIR"
    esft_stage to_hf "$HF_OUT_DIR/config.json" -- "${LAUNCH[@]}" "$tools/convert_mcore_to_hf.py" \
        --load "$SAVE_DIR" --out "$HF_OUT_DIR"
    esft_log "done"
}
