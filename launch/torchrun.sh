#!/usr/bin/env bash
# Single node, N processes (GPUs), one `tokensift fit` recipe:
#   launch/torchrun.sh 8 -c configs/dynamicvit_digits.yaml --trainer.strategy ddp
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NUM_PROCESSES [tokensift fit args...]}"
shift
exec torchrun --standalone --nproc_per_node="$nproc" -m tokensift.cli fit \
  --trainer.devices="$nproc" --trainer.num_nodes=1 "$@"
