#!/usr/bin/env bash
# One short GPU session, start to end: build hfquant with the CUDA kernels, run the CUDA
# tests, time the CUDA benchmark (with the skinny-kernel sweep). Meant for a lent GPU with
# a few minutes of device time: every step has a time limit, logs and results go to $OUT
# (default /tmp/hfquant-cuda-session), and the last lines printed are the summary.
#
#     OUT=/some/dir bash benchmarks/cuda_session.sh            # sm_90 (H100/H200)
#     ARCH=8.0 bash benchmarks/cuda_session.sh                 # an A100
#
# Uses the machine's python3 (its torch must be a CUDA build) and installs nothing from the
# network: the build needs scikit-build-core, pybind11, ninja and cmake already there.
# bitsandbytes (a competitor in the benchmark) is installed from a wheel in .whl/ when one is
# there (.whl/ is git-ignored; fetch it where pip reaches an index and carry the folder):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hfquant-cuda-session}
ARCH=${ARCH:-9.0}
PY=${PY:-python3}
# per-step limits (s); their sum stays under a 10-minute command with the machine's start
BUILD_S=${BUILD_S:-240}
TEST_S=${TEST_S:-180}
BENCH_S=${BENCH_S:-150}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, torch.cuda.get_device_name())"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if ls .whl/bitsandbytes-*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/hfquant-site .whl/bitsandbytes-*.whl \
    && export PYTHONPATH=/tmp/hfquant-site${PYTHONPATH:+:$PYTHONPATH}
fi

stamp "build (TORCH_CUDA_ARCH_LIST=$ARCH)"
if ! TORCH_CUDA_ARCH_LIST="$ARCH" HFQUANT_CUDA=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    timeout "$BUILD_S" $PY -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  stamp "BUILD FAILED (log: $OUT/build.log)"
  exit 1
fi
$PY -c "import hfquant._C as c; assert c.cuda_built, 'built without CUDA'; print('cuda_built', c.cuda_built)" \
  || { stamp "hfquant._C did not import with CUDA kernels (see above)"; exit 1; }

stamp "CUDA tests"
# the junit XML keeps every case's outcome
timeout "$TEST_S" $PY -m pytest -q -p no:cacheprovider -m cuda tests/ops tests/integration/test_cuda_models.py \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
test_rc=$?
tail -25 "$OUT/tests.log"
stamp "tests exit $test_rc"

stamp "CUDA benchmark (--sweep)"
PYTHONUNBUFFERED=1 timeout "$BENCH_S" $PY benchmarks/bench_cuda.py --sweep --json "$OUT/bench.json" \
  > "$OUT/bench.log" 2>&1
bench_rc=$?
stamp "benchmark exit $bench_rc"

echo
echo "== summary ($(head -1 "$OUT/machine.txt")) =="
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
if grep -q "^| kind" "$OUT/bench.log"; then
  sed -n '/^| kind/,$p' "$OUT/bench.log"
else  # stopped early: the rows it printed as it went
  grep -E "^  \| " "$OUT/bench.log" | sed 's/^  //'
fi
stamp "done: tests $test_rc, benchmark $bench_rc; files in $OUT"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
