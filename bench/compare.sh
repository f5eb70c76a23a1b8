#!/usr/bin/env bash
# Side-by-side CPU benchmark, in one run on one machine: this project's `resnet-infer bench` against
# ../shared/reference/pytorch_bench.py as PyTorch eager (NCHW), PyTorch channels_last and, for inference,
# ONNX Runtime. The ratio is ours over the strongest peer of the row.
#
# usage: bench/compare.sh [--isa avx512|avx2|generic] [PYTHON]
#   PYTHON: a Python with torch and onnxruntime (../shared/reference/setup-torch.sh makes /tmp/torchenv).
#   --isa avx2: our AVX2 kernel set (RESNET_CPU_ISA=avx2) against PyTorch limited to AVX2
#               (ONEDNN_MAX_CPU_ISA=AVX2); ONNX Runtime has no such switch and is left out.
#   COMPARE_SECONDS: seconds each peer runs per round (default 15).
#   COMPARE_ROUNDS: rounds per case (default 1). Each round runs ours, then every peer, back to back; a cell is
#     the median img/s of its rounds, and the ratio the median of the rounds' own ratios, with their range
#     when there are several rounds: a shared VM whose speed drifts from minute to minute moves the two sides of
#     one round together, not the medians of separate runs.
#   COMPARE_CASES: the cases to run, separated by spaces (default all: train-cifar20 train-r18 infer-r50-b1
#     infer-r50-b16 infer-cifar56-b500), to rerun a row that a disturbance of the machine spoiled.
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
ROUNDS=${COMPARE_ROUNDS:-1}
CASES=${COMPARE_CASES:-train-cifar20 train-r18 infer-r50-b1 infer-r50-b16 infer-cifar56-b500}
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
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) threads; $(date -u +%F); $ROUNDS round(s) of ${SECONDS_PER_PEER} s per peer"
$BIN bench --peak | head -1
row() { # case, our bench args
  local rounds="" round variant out
  if [[ " $CASES " != *" $1 "* ]]; then return; fi
  for ((r = 0; r < ROUNDS; r++)); do
    round=$($BIN bench $2 --json | tail -1)
    for variant in $PEERS; do
      if [[ $variant == ort && $1 == train-* ]]; then continue; fi
      out=$($PY "$REF" "$1" --seconds "$SECONDS_PER_PEER" --variant "$variant" 2>/dev/null | tail -1)
      round="$round;$out"
    done
    rounds="$rounds|$round"
  done
  python3 - "$1" "$rounds" <<'PYEOF'
import json, re, statistics, sys
case, rounds = sys.argv[1], [r for r in sys.argv[2].split("|") if r]
ours, peers = [], {}  # per round: (img/s, peak RSS MB)
for r in rounds:
    first, *rest = r.split(";")
    o = json.loads(first)
    ours.append((o["images_per_second"], o["peak_rss_mb"], o["isa"]))
    for p in filter(None, rest):
        v = re.search(r"variant=(\w+)", p).group(1)
        peers.setdefault(v, []).append(
            (float(re.search(r"img/s=([0-9.]+)", p).group(1)), int(re.search(r"peak_rss_mb=([0-9]+)", p).group(1))))
med = statistics.median
cell = lambda v: f"{med(x[0] for x in peers[v]):.1f} ({max(x[1] for x in peers[v])} MB)" if v in peers else "–"
best = max(peers, key=lambda v: med(x[0] for x in peers[v]))
ratios = lambda v: [o[0] / p[0] for o, p in zip(ours, peers[v])]
spread = f" ({min(ratios(best)):.2f}–{max(ratios(best)):.2f})" if len(rounds) > 1 else ""
print(f"| {case} | {ours[0][2]} | {med(o[0] for o in ours):.1f} ({max(o[1] for o in ours):.0f} MB) | {cell('eager')} "
      f"| {cell('cl')} | {cell('ort')} | {med(ratios('eager')):.2f}× | **{med(ratios(best)):.2f}×** {best}{spread} |")
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
