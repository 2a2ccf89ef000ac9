#!/usr/bin/env bash
# Every GPU check of the project in one go, for a session that is lent a GPU for a few minutes:
# the attention benchmark, the 8B decode benchmark, the kernel tests compiled for the GPU (Triton and
# Mosaic GPU; the TPU build's interpreted tests are left to the CPU suite).
# Logs and result tables go to $OUT (default: ./gpu_out). Usage: bash benchmarks/gpu_session.sh
# Stage budgets (seconds, 0 skips): ATTN_S 240, DECODE_S 80, TEST_S 100 (Mosaic GPU kernel tests),
# TEST_REST_S 120 (the other GPU kernel tests), DECODE_CB_S 60: 600 s at most, one device call.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# each stage runs under `timeout` for its *_S seconds; 0 skips it (for a lease too short for all)
stage() { [ "$1" -gt 0 ] 2>/dev/null || { echo "skipped (0 s)"; return 0; }; timeout "$@"; }
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  $PY -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.log"
# cuDNN, our kernels at their defaults (the Mosaic GPU forward on Hopper), then with the Triton forward
# (xla, the slow baseline, and tile sweeps such as pallas:128x128d64w8s2 or pallas:mgpu:64x64s3 left
# to ATTN_IMPLS); three implementations took about 90 s on an H200
stage "${ATTN_S:-240}" $PY benchmarks/attention.py --repeats 5 --calls 10 --out "$OUT/attention.md" \
  --implementations "${ATTN_IMPLS:-cudnn,pallas,pallas:triton,pallas:mgpu:bwd,pallas:mgpu:bwd:64x64s3}" 2>&1 \
  | tee "$OUT/attention.log" | grep -v "^(" | tail -20
stage "${DECODE_S:-80}" $PY benchmarks/decode_gpu.py --repeats 2 --out "$OUT/decode.md" 2>&1 | tail -12 \
  | tee "$OUT/decode.log"
# in one process (pytest.ini's two xdist workers would share the GPU, and xdist may not be installed).
# Seen on an H200 (jax 0.11.2): with JAX_DEFAULT_MATMUL_PRECISION=highest the float32 Triton
# gradient did not compile within 35 s (test_flash_causal_packed[None-float32]); without it the
# float32 forward is TF32-accurate (2.1e-4), over the tests' 1e-5. So the mgpu tests come first, then
# the bfloat16 Triton tests and the float32 model-logits test (a forward: it compiled under highest).
for part in mgpu rest; do
  if [ $part = mgpu ]; then pick="mgpu"; budget=${TEST_S:-100}
  else pick="(bfloat16 or model_logits) and not mgpu and not splash and not tpu and not mosaic"; budget=${TEST_REST_S:-120}; fi
  JAX_DEFAULT_MATMUL_PRECISION=highest stage "$budget" env $PY -m pytest -v tests/test_kernels.py -o addopts="" \
    -p no:cacheprovider -o faulthandler_timeout=60 -k "$pick" 2>&1 | tee "$OUT/kernel_tests_$part.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|Timeout"
done
# last, in whatever time is left: decode with the while loop captured as a CUDA graph (XLA command
# buffers), to test whether per-kernel launches are what keeps decode at 67% of the HBM bound
XLA_FLAGS="${CB_FLAGS:---xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL}" stage "${DECODE_CB_S:-60}" \
  env $PY benchmarks/decode_gpu.py --repeats 2 --out "$OUT/decode_command_buffers.md" 2>&1 | tail -12 \
  | tee "$OUT/decode_command_buffers.log"
