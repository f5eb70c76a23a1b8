#!/usr/bin/env bash
# Side-by-side CPU benchmark: this project's `resnet-infer bench` and ../shared/reference/pytorch_bench.py,
# case by case on the same machine, in one run. usage: bench/compare.sh [PYTHON] (a Python with torch:
# ../shared/reference/setup-torch.sh makes one in /tmp/torchenv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-/tmp/torchenv/bin/python}
REF=${RESNET_SHARED:-../shared}/reference/pytorch_bench.py
cargo build -q --release -p resnet-infer
BIN=target/release/resnet-infer
row() { # case, our args
  local ours theirs
  ours=$($BIN bench $2 --json | tail -1)
  theirs=$($PY "$REF" "$1" --seconds 15)
  python3 - "$1" "$ours" "$theirs" <<'PYEOF'
import json, sys, re
case, ours, theirs = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
t_ips = float(re.search(r"img/s=([0-9.]+)", theirs).group(1)); t_rss = int(re.search(r"peak_rss_mb=([0-9]+)", theirs).group(1))
o_ips, o_rss = ours["images_per_second"], ours["peak_rss_mb"]
print(f"| {case} | {o_ips:.1f} | {t_ips:.1f} | {o_ips / t_ips:.2f}x | {o_rss:.0f} | {t_rss} |")
PYEOF
}
echo "| case | ours img/s | PyTorch img/s | ratio | ours peak RSS MB | PyTorch peak RSS MB |"
echo "|---|---|---|---|---|---|"
row train-cifar20 "--model resnet20 --batch-size 128 --train --iterations 30"
row train-r18 "--model resnet18 --batch-size 16 --train --iterations 3"
row infer-r50-b1 "--model resnet50 --batch-size 1 --iterations 40"
row infer-r50-b16 "--model resnet50 --batch-size 16 --iterations 4"
row infer-cifar56-b500 "--model resnet56 --batch-size 500 --iterations 3"
echo
echo "GFLOP/s of our convolution op on each ResNet-20 shape (batch 128; peak of two Zen 4 cores, one 512-bit FMA per cycle each: 166 GFLOP/s at 2.6 GHz, ~235 at boost):"
$BIN bench --model resnet20 --batch-size 128 --train --iterations 10 --convs | tail -n +2
