#!/bin/bash
# Single-machine training on every visible GPU (Lightning starts one process per GPU).
#   launch/local.sh recipes/my_recipe.yaml run.dir=runs/exp1 [key=value ...]
set -euo pipefail
: "${1:?usage: launch/local.sh RECIPE [key=value ...]}"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then
  echo "launch/local.sh: no CUDA device visible; for the CPU run: rwkvx train $*" >&2
  exit 2
fi
strategy=auto
[ "$gpus" -gt 1 ] && strategy=ddp
exec rwkvx train "$@" trainer.accelerator=gpu trainer.devices="$gpus" trainer.strategy="$strategy"
