#!/usr/bin/env bash
# Data-parallel training on one machine: 1 process with every core vs N ranks under mpirun with one core each,
# the same global batch, in one run. ResNet-20 on the CIFAR-10 JPEGs of ../shared (global batch 128) and ResNet-18
# on the ImageNet samples of ../shared (20 photos, one class folder per label; global batch 16; imagenet-paper
# augmentation). Prints img/s (mean of the log lines after the first), and for the ranks the all-reduce time,
# its share of the run and the wait for the slowest rank, as resnet-train reports them.
# usage: bench/distributed.sh [RANKS=2] [ITERATIONS_R20=60] [ITERATIONS_R18=24]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
IT20=${2:-60}
IT18=${3:-24}
SHARED=${RESNET_SHARED:-../shared}
cargo build -q --release -p resnet-train --features mpi
BIN=$PWD/target/release/resnet-train
W=${TMPDIR:-/tmp}/resnet-distributed-bench
mkdir -p "$W"
# Training splits only (no test/): no evaluation inside the timed runs.
if [ ! -d "$W/cifar/train" ]; then
  mkdir -p "$W/cifar"
  tar xzf "$SHARED/data/cifar10-jpg-train.tar.gz" -C "$W/cifar"
fi
if [ ! -d "$W/imagenet/train" ]; then
  for f in "$SHARED"/data/imagenet-samples/*.jpg; do
    l=${f##*label-}; l=${l%.jpg}
    mkdir -p "$W/imagenet/train/$l"; ln -sf "$(realpath "$f")" "$W/imagenet/train/$l/"
  done
fi
MPI=(mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$N" -x OMPI_MCA_btl_vader_single_copy_mechanism=none)
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) threads; $(mpirun --version | head -1)"

# name, model, recipe, global batch, iterations, log every
report() { # label, log file
  python3 - "$1" "$2" <<'EOF'
import re, sys
label, path = sys.argv[1], sys.argv[2]
text = open(path, encoding="utf-8", errors="replace").read()
ips = [float(m) for m in re.findall(r"iteration \d+/\d+ .*?, ([0-9.]+) img/s", text)][1:]
ar = re.search(r"all-reduce: ([0-9.]+) ms per step on rank 0, ([0-9.]+) % of the run; waiting for the slowest rank ([0-9.]+) ms", text)
vol = re.search(r"; (\d+) bytes of gradients all-reduced per step", text)
extra = f" | {ar.group(1)} ms | {ar.group(2)} % | {ar.group(3)} ms | {vol.group(1)}" if ar else " | – | – | – | –"
print(f"| {label} | {sum(ips)/max(len(ips),1):.1f}{extra} |")
EOF
}
echo "| run | img/s | all-reduce per step | all-reduce share | wait for slowest rank per step | gradient bytes per step |"
echo "|---|---|---|---|---|---|"
for spec in "resnet20 cifar-paper 128 $IT20 10 cifar" "resnet18 imagenet-paper 16 $IT18 4 imagenet"; do
  set -- $spec
  common=(--model "$1" --recipe "$2" --iterations "$4" --log-every "$5" --eval-every 0 --holdout 0 --checkpoint-every 0 --data "$W/$6")
  "$BIN" "${common[@]}" --batch-size "$3" --out "$W/$1-1" > "$W/$1-1.log" 2>&1
  report "$1, 1 process × $(nproc) threads, batch $3" "$W/$1-1.log"
  "${MPI[@]}" "$BIN" --distributed "${common[@]}" --batch-size $(($3 / N)) --out "$W/$1-$N" > "$W/$1-$N.log" 2>&1
  report "$1, $N ranks × $(($(nproc) / N)) thread(s), batch $N × $(($3 / N))" "$W/$1-$N.log"
done
