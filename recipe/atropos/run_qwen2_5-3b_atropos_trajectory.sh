#!/usr/bin/env bash
# Trajectory mode, trainer only: Qwen2.5-3B-Instruct on one 8-GPU node pulls its batches from
# atroposlib's run-api; environments generate through the trainer's policy gateway (port 8001).
#
#   run-api &                                                                # atroposlib's trajectory API
#   bash recipe/atropos/run_qwen2_5-3b_atropos_trajectory.sh trainer.atropos.trajectory_api_url=http://localhost:8000
#   # once http://localhost:8001/health answers:
#   python recipe/atropos/environments/atropos_gsm8k_env.py serve --slurm false \
#       --openai.base_url http://localhost:8001/v1 --openai.server_type vllm ...
#
# (recipe/atropos/launch_atropos_verl_services.py --config .../gsm8k_trajectory_example.yaml does all
# three in order.) Every argument is passed through as a Hydra override.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m verl.trainer.main_ppo \
    --config-path recipe/atropos/config \
    --config-name gsm8k_trajectory_example \
    "$@"
