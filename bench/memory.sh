#!/usr/bin/env bash
# Training memory over depth, ours next to PyTorch in one run: peak RSS of SGD steps of the option-A CIFAR
# ResNets (batch 128) and the pre-activation bottleneck nets (batch 64), what our forward keeps for backward,
# and the fitted bytes-per-unit slope of each family (least squares of peak RSS over residual units).
# usage: bench/memory.sh [PYTHON] [--recompute]   (a Python with torch: ../shared/reference/setup-torch.sh makes
# one in /tmp/torchenv). With --recompute our side runs with activation recomputation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-/tmp/torchenv/bin/python}
EXTRA=${2:-}
REF=${RESNET_SHARED:-../shared}/reference/mem_ref.py
cargo build -q --release -p resnet-infer
BIN=target/release/resnet-infer
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) threads"
rows=()
# name, batch, units, mem_ref.py arguments
for spec in "resnet20 128 9 20" "resnet56 128 27 56" "resnet110 128 54 110" "resnet1202 128 600 1202" \
            "preact_resnet164 64 54 164:preact" "preact_resnet1001 64 333 1001:preact"; do
  set -- $spec
  ours=$($BIN bench --model "$1" --batch-size "$2" --train --iterations 1 $EXTRA --json | tail -1)
  theirs=$($PY "$REF" ${4%%:*} "$2" $( [[ $4 == *:preact ]] && echo preact ))
  rows+=("$1 $2 $3 $(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(j["peak_rss_mb"], j["saved_activations_mb"], j["images_per_second"])' "$ours") $(sed -E 's/.*peak_rss_mb=([0-9]+) img\/s=([0-9.]+).*/\1 \2/' <<<"$theirs")")
done
printf '%s\n' "${rows[@]}" | python3 -c '
import sys
rows = [l.split() for l in sys.stdin if l.strip()]
print("| net | batch | units | ours peak RSS MB | ours saved for backward MB | PyTorch peak RSS MB | ours / PyTorch | ours img/s | PyTorch img/s |")
print("|---|---|---|---|---|---|---|---|---|")
for n, b, u, rss, saved, ips, trss, tips in rows:
    print(f"| {n} | {b} | {u} | {float(rss):.0f} | {float(saved):.0f} | {trss} | {float(rss)/float(trss):.2f} | {float(ips):.1f} | {tips} |")
def slope(pts):
    n = len(pts); mx = sum(x for x, _ in pts) / n; my = sum(y for _, y in pts) / n
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
for family, batch in (("resnet", "128"), ("preact_resnet", "64")):
    sel = [r for r in rows if r[0].startswith(family) and not r[0].startswith("resnetv2") and (family != "resnet" or not r[0].startswith("preact"))]
    ours = slope([(int(r[2]), float(r[3])) for r in sel]); theirs = slope([(int(r[2]), float(r[6])) for r in sel])
    print(f"{family}* at batch {batch}: peak RSS per residual unit, ours {ours:.1f} MB, PyTorch {theirs:.1f} MB: {ours / theirs:.2f}x")
'
