#!/usr/bin/env bash
# Builds resnet-train with `--features cuda,nccl` (data-parallel CUDA ranks: gradients summed by NCCL, the rest
# over MPI) on a machine without a CUDA toolkit: adds NCCL from NVIDIA's PyPI wheel to the stand-in CUDA root of
# ../shared/gpu/build-cuda.sh, then runs that script. Output: target-cuda/dist/resnet-train-cuda,nccl.
# Needs Open MPI (libopenmpi-dev, libclang-dev) as the `mpi` feature does. At run time libnccl.so.2 must be
# found: LD_LIBRARY_PATH=<venv>/site-packages/nvidia/nccl/lib.
set -euo pipefail
W=${CUDA_WHEELS_DIR:-/tmp/cuda13}
[ -x "$W/venv/bin/python" ] || python3 -m venv "$W/venv"
"$W/venv/bin/pip" install -q --no-deps "nvidia-nccl-cu13==2.32.3"
SP=$("$W/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
mkdir -p "$W/cuda/lib64"
ln -sfn "$SP/nvidia/nccl/lib/libnccl.so.2" "$W/cuda/lib64/libnccl.so.2"
ln -sfn libnccl.so.2 "$W/cuda/lib64/libnccl.so"
cd "$(dirname "$0")/../.."
exec "${RESNET_SHARED:-../shared}/gpu/build-cuda.sh" resnet-train cuda,nccl
