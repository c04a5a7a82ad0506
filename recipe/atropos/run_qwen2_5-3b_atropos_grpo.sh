#!/usr/bin/env bash
# GRPO on GSM8K with Qwen2.5-3B-Instruct and advantages from the environment service, one 8-GPU node.
#
#   python recipe/atropos/environments/gsm8k_server.py serve &      # the environment service
#   bash recipe/atropos/run_qwen2_5-3b_atropos_grpo.sh trainer.atropos.api_url=http://localhost:9001
#
# Every argument is passed through as a Hydra override (data.train_files=..., trainer.nnodes=2, ...).
# Data: python recipe/atropos/prepare_gsm8k.py --out ~/data/gsm8k
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m verl.trainer.main_ppo \
    --config-path recipe/atropos/config \
    --config-name gsm8k_grpo_example \
    "$@"
