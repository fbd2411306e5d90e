#!/usr/bin/env bash
# On a machine with a CUDA GPU (never needed, never in CI): the CUDA-marked tests, then the
# ResNet / CIFAR-10 grid of issue 27, one seed, from the published checkpoints in ../shared/models
# (fine-tuned dense on the JPEG training set by `train --pretrained`). Aimed at under 10 minutes
# on an H100-class GPU; every run is a `python -m jointcomp` command with the CLI's defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SHARED=$(cd .. && pwd)/shared
export JOINTCOMP_DATA=${JOINTCOMP_DATA:-$SHARED/data}
$PY -m pytest -q -m cuda tests
cd bench
$PY quality.py --model resnet20 --data cifar10 --pretrained "$SHARED/models/resnet20-12fca82f.th" --dense-epochs 3 \
    --targets 50x 200x --seeds 0
$PY quality.py --model resnet56 --data cifar10 --pretrained "$SHARED/models/resnet56-4bfd9763.th" --dense-epochs 3 \
    --targets 200x --methods admm --seeds 0
