#!/usr/bin/env bash
# Side-by-side CPU benchmark, in one run on one machine: this project's `resnet-infer bench` against
# ../shared/reference/pytorch_bench.py as PyTorch eager (NCHW), PyTorch channels_last and, for inference,
# ONNX Runtime. The ratio is ours over the strongest peer of the row.
#
# usage: bench/compare.sh [--isa avx512|avx2|generic] [PYTHON]
#   PYTHON: a Python with torch and onnxruntime (../shared/reference/setup-torch.sh makes /tmp/torchenv).
#   --isa avx2: our AVX2 kernel set (RESNET_CPU_ISA=avx2) against PyTorch limited to AVX2
#               (ONEDNN_MAX_CPU_ISA=AVX2); ONNX Runtime has no such switch and is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
ISA=""
if [[ "${1:-}" == "--isa" ]]; then
  ISA=$2
  shift 2
fi
PY=${1:-/tmp/torchenv/bin/python}
REF=${RESNET_SHARED:-../shared}/reference/pytorch_bench.py
SECONDS_PER_PEER=${COMPARE_SECONDS:-15}
cargo build -q --release -p resnet-infer
BIN=target/release/resnet-infer
PEERS="eager cl ort"
if [[ -n "$ISA" ]]; then
  export RESNET_CPU_ISA=$ISA
  if [[ "$ISA" != avx512 ]]; then
    export ONEDNN_MAX_CPU_ISA=AVX2
    PEERS="eager cl"
  fi
fi
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) threads; $(date -u +%F)"
$BIN bench --peak | head -1
row() { # case, our bench args
  local ours peers="" variant out
  ours=$($BIN bench $2 --json | tail -1)
  for variant in $PEERS; do
    if [[ $variant == ort && $1 == train-* ]]; then continue; fi
    out=$($PY "$REF" "$1" --seconds "$SECONDS_PER_PEER" --variant "$variant" 2>/dev/null | tail -1)
    peers="$peers;$out"
  done
  python3 - "$1" "$ours" "$peers" <<'PYEOF'
import json, sys, re
case, ours, peers = sys.argv[1], json.loads(sys.argv[2]), [p for p in sys.argv[3].split(";") if p]
found = {}
for p in peers:
    v = re.search(r"variant=(\w+)", p).group(1)
    found[v] = (float(re.search(r"img/s=([0-9.]+)", p).group(1)), int(re.search(r"peak_rss_mb=([0-9]+)", p).group(1)))
cell = lambda v: f"{found[v][0]:.1f} ({found[v][1]} MB)" if v in found else "–"
best = max(found, key=lambda v: found[v][0])
o_ips, o_rss = ours["images_per_second"], ours["peak_rss_mb"]
print(f"| {case} | {ours['isa']} | {o_ips:.1f} ({o_rss:.0f} MB) | {cell('eager')} | {cell('cl')} | {cell('ort')} "
      f"| {o_ips / found['eager'][0]:.2f}× | **{o_ips / found[best][0]:.2f}×** {best} |")
PYEOF
}
echo
echo "| case | our kernels | ours img/s (peak RSS) | PyTorch eager | PyTorch channels_last | ONNX Runtime | ours / eager | ours / best peer |"
echo "|---|---|---|---|---|---|---|---|"
row train-cifar20 "--model resnet20 --batch-size 128 --train --iterations 30"
row train-r18 "--model resnet18 --batch-size 16 --train --iterations 4"
row infer-r50-b1 "--model resnet50 --batch-size 1 --iterations 40"
row infer-r50-b16 "--model resnet50 --batch-size 16 --iterations 4"
row infer-cifar56-b500 "--model resnet56 --batch-size 500 --iterations 4"
