#!/usr/bin/env bash
# `make gpu-check`: everything one GPU run must confirm (shared/guide/gpu-check.md), inside 10 minutes,
# with no network. Uses the machine's own python3/torch. Logs and results go to $OUT when set,
# else benchmarks/results/ (plain logs, at most 8 files: the device tool returns no more). Order: install, the suite without the large grids, memcheck, the
# benchmarks (one entry at a time), then the large grids (-m slow) in the time left; --fast skips those.
set -uo pipefail
cd "$(dirname "$0")/.."
FAST=0; [ "${1:-}" = "--fast" ] && FAST=1
DEST="${OUT:-benchmarks/results}"; mkdir -p "$DEST"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 FASTLM_CUDA_ARCHS="${FASTLM_CUDA_ARCHS:-90a}"
T0=$SECONDS
declare -A STATUS
step() { echo; echo "=== $1 ($((SECONDS - T0)) s)"; }

step "install (editable, machine torch, sm_${FASTLM_CUDA_ARCHS})"
if ! $PY -m pip install -q -e . --no-deps --no-build-isolation 2>"$DEST/install.log"; then
  echo "pip install -e failed (see install.log); building in place and using PYTHONPATH"
  $PY setup.py -q build_ext --inplace >>"$DEST/install.log" 2>&1
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -m fastlm info | tee -a "$DEST/install.log"; STATUS[install]=$([ ${PIPESTATUS[0]} -eq 0 ] && echo ok || echo FAILED)
$PY -m fastlm.cuda >/dev/null 2>&1 && STATUS[extension]=ok || STATUS[extension]="FAILED (fastlm._C did not load)"

step "test suite on the GPU, triton and cuda backends (tests/, bf16 included): all but the large grids"
timeout 270 $PY -m pytest tests -q --maxfail=30 -p no:cacheprovider -m "not slow" 2>&1 | tee "$DEST/pytest-gpu.log" | tail -n 25
rc=${PIPESTATUS[0]}; STATUS[tests]=$([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc, see pytest-gpu.log)")

step "compute-sanitizer memcheck over a small CUDA subset"
if command -v compute-sanitizer >/dev/null; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool memcheck --error-exitcode 99 --target-processes all \
    $PY -m pytest tests -q -p no:cacheprovider -m sanitize -k cuda 2>&1 | tee "$DEST/memcheck.log" | tail -n 8
  rc=${PIPESTATUS[0]}; STATUS[memcheck]=$([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc, see memcheck.log)")
else
  STATUS[memcheck]="skipped: compute-sanitizer not found"
fi

step "fastlm bench, one entry at a time (a timeout loses one entry, not the run)"
STAMP="$($PY -c 'import torch,re;print(re.sub(r"[^A-Za-z0-9]+","-",torch.cuda.get_device_name()).strip("-"))')-$(date -u +%Y%m%d)"
mkdir -p "$DEST/parts"; rm -f "$DEST"/parts/*.json
STATUS[bench]=ok
for op in $($PY -m fastlm bench --list | awk '{print $1}'); do
  left=$((560 - (SECONDS - T0))); [ $left -lt 20 ] && { STATUS[bench]="partial: no time left for $op and after"; break; }
  timeout $left $PY -m fastlm bench "$op" --json "$DEST/parts/$op.json" >>"$DEST/bench.log" 2>&1 || STATUS[bench]="partial or failed (see bench.log; last: $op)"
done
$PY benchmarks/perf_table.py --merge "$DEST/bench-$STAMP.json" "$DEST"/parts/*.json && rm -rf "$DEST/parts"
[ -f "$DEST/bench-$STAMP.json" ] || STATUS[bench]="FAILED: no results"

if [ $FAST = 0 ] && [ $((SECONDS - T0)) -lt 540 ]; then
  step "the large GPU grids (-m slow), in the time left"
  timeout $((580 - (SECONDS - T0))) $PY -m pytest tests -q -p no:cacheprovider -m "gpu and slow" >"$DEST/pytest-gpu-slow.log" 2>&1
  rc=$?; STATUS[slow-tests]=$([ $rc -eq 0 ] && echo ok || echo "FAILED or cut short (rc $rc, see pytest-gpu-slow.log)")
fi

step "summary"
[ -f "$DEST/bench-$STAMP.json" ] && $PY benchmarks/perf_table.py "$DEST/bench-$STAMP.json" --print
for k in install extension tests memcheck bench slow-tests; do printf '%-10s %s\n' "$k" "${STATUS[$k]:-not run}"; done
echo "total $((SECONDS - T0)) s; results in $DEST"
for k in install extension tests memcheck bench; do case "${STATUS[$k]:-}" in ok|skipped*) ;; *) exit 1;; esac; done
