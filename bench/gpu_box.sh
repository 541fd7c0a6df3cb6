#!/usr/bin/env bash
# Every figure of docs/gpu.md, measured on one GPU box, written under OUT (default gpu_figures/).
#
#   bash bench/gpu_box.sh [OUT] [PARTS]
#
# PARTS, comma-separated (default tests,reproduce,extract,cpu):
#   tests      the CUDA tests (pytest -m gpu), their log in OUT/tests.log
#   reproduce  the full 8x3 Table 6 reproduction on 12,000 synthetic trailers on the GPU
#              (bench_reproduce.py --device cuda), OUT/reproduce.json
#   extract    the six Table 6 backbones on 1280x544 videos (bench_extract.py --device cuda,
#              random weights: speed does not depend on their values), OUT/extract.json
#   cpu        on the box's CPU, 2 threads on 2 cores: fp32, bf16 and `auto` training speed
#              (bench_train.py), OUT/cpu.log
# Each part runs under its own time limit; OUT/steps.txt lists each part's exit status and
# seconds, and OUT/machine.txt the GPU, CPU and library versions. T12K_PYTEST_K selects tests
# by name (pytest -k).
#
# A box without internet: put the wheels the project needs and the box lacks under .gpu/whl
# (pip download --no-deps --only-binary=:all: --python-version 3.12
#  --platform manylinux_2_28_x86_64 -d .gpu/whl NAME==VERSION); they are installed into
# .gpu/site, which is put on PYTHONPATH with the checkout.
set -u
OUT=${1:-gpu_figures}
PARTS=${2:-tests,reproduce,extract,cpu}
PY=${PYTHON:-python3}
DATA=${T12K_BENCH_DATA:-/tmp/t12k_synth12k}
mkdir -p "$OUT"
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
  $PY -m pip install --quiet --no-index --no-deps --target .gpu/site .gpu/whl/*.whl 2>&1 | tail -3
fi
export PYTHONPATH=$PWD:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
export T12K_CACHE_DIR=$(cd "$OUT" && pwd)/t12k-cache  # the precision probe's record comes back with the figures

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  lscpu | grep -E "Model name|^CPU\(s\)"
  grep -o -w -E "amx_bf16|avx512_bf16" /proc/cpuinfo | sort | uniq -c
  $PY -c "import torch, torchvision, av; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'av', av.__version__)"
} > "$OUT/machine.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run it, its output in OUT/NAME.log
  local name=$1 limit=$2 t0
  shift 2
  t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.txt"
}
has() { [[ ",$PARTS," == *",$1,"* ]]; }

SIX=shufflenet_v2_x1_0,resnet50,swin_t,r2plus1d_18,swin3d_t,shufflenet_v2_3d_x1_0
has tests && step tests 200 $PY -m pytest -q -p no:cacheprovider -m gpu ${T12K_PYTEST_K:+-k "$T12K_PYTEST_K"} \
  tests/test_train.py tests/test_grouped.py tests/test_extract.py tests/test_shots.py tests/test_runtime.py
has reproduce && step reproduce 300 $PY bench/bench_reproduce.py --device cuda --data "$DATA" \
  --out /tmp/t12k_reproduce --json "$OUT/reproduce.json"
has extract && step extract 300 $PY bench/bench_extract.py --backbones $SIX --device cuda --workers -1 \
  --videos 8 --seconds 20 --copies 4 --size 1280x544 --batch-size 32 --random-weights --json "$OUT/extract.json"
has cpu && step cpu 150 env CUDA_VISIBLE_DEVICES= taskset -c 0,1 $PY bench/bench_train.py --threads 2 \
  --sections throughput
exit 0
