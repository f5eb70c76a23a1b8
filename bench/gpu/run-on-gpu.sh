#!/usr/bin/env bash
# All GPU measurements of issue #7 in one command, for a machine with a GPU (the device tool).
# Prepare here (no GPU needed):
#   ../shared/gpu/build-cuda.sh resnet-infer cuda          # -> target-cuda/dist/resnet-infer-cuda.xz
#   mkdir -p .device && cp ../shared/gpu/run-on-device.sh ../shared/reference/cifar_ref.py .device/
# Then on the device (run tool, carry target-cuda/dist and .device):  bash bench/gpu/run-on-gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
RUN="bash .device/run-on-device.sh target-cuda/dist/resnet-infer-cuda.xz"
cp .device/cifar_ref.py bench/gpu/ 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$RUN --help | head -3                                       # the binary loads its CUDA libraries
$RUN bench --model resnet20 --batch-size 128 --train --iterations 50 --device cuda:0
$RUN bench --model resnet50 --batch-size 128 --train --iterations 10 --device cuda:0
$RUN bench --model resnet50 --batch-size 128 --iterations 20 --device cuda:0
python3 bench/gpu/pytorch_gpu_bench.py train-cifar20
python3 bench/gpu/pytorch_gpu_bench.py train-r50
