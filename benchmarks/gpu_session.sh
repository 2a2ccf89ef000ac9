#!/usr/bin/env bash
# Every GPU check of the project in one go, for a session that is lent a GPU for a few minutes:
# the attention benchmark, the 8B decode benchmark, the kernel tests compiled for the GPU (Triton and
# Mosaic GPU; the TPU build's interpreted tests are left to the CPU suite).
# Logs and result tables go to $OUT (default: ./gpu_out). Usage: bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# each stage runs under `timeout` for its *_S seconds; 0 skips it (for a lease too short for all)
stage() { [ "$1" -gt 0 ] 2>/dev/null || { echo "skipped (0 s)"; return 0; }; timeout "$@"; }
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  $PY -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.log"
# cuDNN, our kernels with the Mosaic GPU (Hopper) forward, then with the Triton one (xla, the slow
# baseline, and tile sweeps such as pallas:128x128d64w8s2 left to ATTN_IMPLS)
stage "${ATTN_S:-240}" $PY benchmarks/attention.py --repeats 10 --out "$OUT/attention.md" \
  --implementations "${ATTN_IMPLS:-cudnn,pallas:mgpu,pallas}" 2>&1 \
  | tee "$OUT/attention.log" | grep -v "^(" | tail -20
stage "${DECODE_S:-150}" $PY benchmarks/decode_gpu.py --repeats 2 --out "$OUT/decode.md" 2>&1 | tail -12 \
  | tee "$OUT/decode.log"
# in one process (pytest.ini's two xdist workers would share the GPU, and xdist may not be installed)
JAX_DEFAULT_MATMUL_PRECISION=highest stage "${TEST_S:-200}" env $PY -m pytest -q tests/test_kernels.py -o addopts="" \
  -p no:cacheprovider --timeout 120 -k "${TESTS:-not splash and not tpu and not mosaic}" 2>&1 | tee "$OUT/kernel_tests.log" | tail -40
# last, in whatever time is left: decode with the while loop captured as a CUDA graph (XLA command
# buffers), to test whether per-kernel launches are what keeps decode at 67% of the HBM bound
XLA_FLAGS="${CB_FLAGS:---xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL}" stage "${DECODE_CB_S:-120}" \
  env $PY benchmarks/decode_gpu.py --repeats 2 --out "$OUT/decode_command_buffers.md" 2>&1 | tail -12 \
  | tee "$OUT/decode_command_buffers.log"
