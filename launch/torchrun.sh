#!/usr/bin/env bash
# One node, N processes (one per GPU; on a CPU-only machine N CPU processes over gloo) of a `tokensift fit` recipe:
#   launch/torchrun.sh 8 -c configs/dynamicvit_digits.yaml --trainer.strategy ddp
#   launch/torchrun.sh 8 -c configs/dynamicvit_digits.yaml --trainer.strategy deepspeed_stage_2 --trainer.precision bf16-mixed
# torchrun starts the processes and Lightning joins them; --trainer.devices is set to N here.
set -euo pipefail
usage="usage: launch/torchrun.sh NUM_PROCESSES [tokensift fit args...]"
nproc="${1:?$usage}"
shift
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_PROCESSES must be a positive integer, got '$nproc'; $usage" >&2
  exit 2
fi
# after the recipe's arguments, so a config file (-c) cannot set another device count
exec torchrun --standalone --nproc_per_node="$nproc" -m tokensift.cli fit "$@" \
  --trainer.devices="$nproc" --trainer.num_nodes=1
