#!/usr/bin/env bash
# Every GPU check of the project in one go, for a session that is lent a GPU for a few minutes:
# the attention benchmark, the train step of the 8B architecture, the kernel tests compiled for the
# GPU (Triton and Mosaic GPU; the TPU build's interpreted tests are left to the CPU suite), and when
# asked (DECODE_S) the 8B decode benchmark.
# Logs and result tables go to $OUT (default: ./gpu_out; 8 files at most, what the device tool
# returns). Usage: bash benchmarks/gpu_session.sh
# Stage budgets (seconds, 0 skips): ATTN_S 180 (cuDNN, our defaults, all-Triton; the Perceiver's
# shape too, where `pallas` is the pooling kernel, never timed before), ATTN_SWEEP_S 0 (other builds
# and tiles, run apart: a kernel that hangs loses only its own rows), TRAIN_S 220 (the whole train
# step of the 8B architecture with 6 decoder layers: `auto` against `xla`), TEST_BWD_S 60 (the Mosaic
# GPU backward's quick tests), TEST_S 80 (the Mosaic GPU forward's), TEST_REST_S 50 (the Triton ones),
# DECODE_S 0, DECODE_INT8_S 0, DECODE_CB_S 0 (the 8B decode runs, bfloat16 and int8 weights): 590 s at
# most, one device call. On an H100
# (2026-11-28) the two attention runs (defaults and sweep, three shapes) took about 250 s together.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# each stage runs under `timeout` for its *_S seconds; 0 skips it (for a lease too short for all)
stage() { [ "$1" -gt 0 ] 2>/dev/null || { echo "skipped (0 s)"; return 0; }; timeout "$@"; }
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  $PY -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.log"
# cuDNN, our kernels at their defaults (on Hopper: Mosaic GPU's forward and backward) and all-Triton;
# then, when ATTN_SWEEP_S is set, the Mosaic GPU forward before Triton's backward and the Mosaic GPU
# backward's 3-stage tiles (xla, the slow baseline, and tile sweeps such as pallas:128x128d64w8s2 or pallas:mgpu:64x64s3 left
# to ATTN_IMPLS / ATTN_SWEEP_IMPLS)
attention() {  # budget, output name, implementations
  [ "$1" -gt 0 ] || { echo "$2 skipped (0 s)"; return 0; }
  stage "$1" $PY benchmarks/attention.py --repeats 5 --calls 10 --out "$OUT/$2.md" --implementations "$3" 2>&1 \
    | tee "$OUT/$2.log" | grep -v "^(" | tail -20
}
attention "${ATTN_S:-180}" attention "${ATTN_IMPLS:-cudnn,pallas,pallas:triton}"
attention "${ATTN_SWEEP_S:-0}" attention_sweep "${ATTN_SWEEP_IMPLS:-pallas:mgpu,pallas:mgpu:bwd:64x64s3}"
# the whole train step (vision tower, Perceiver, decoder, AdamW): MFU with our kernels against XLA's
# attention; the table's rows print as each implementation finishes (train.log)
if [ "${TRAIN_S:-220}" -gt 0 ]; then
  stage "${TRAIN_S:-220}" $PY benchmarks/train_gpu.py --steps 5 --implementations "${TRAIN_IMPLS:-auto,xla}" \
    --out "$OUT/train.md" 2>&1 | tee "$OUT/train.log" | tail -12
fi
decode() {  # budget, output name (its table; the log's end goes to the terminal: $OUT takes 8 files), flags
  # then one traced generation read per op class (matmuls, attention, cache writes, sampling, ...)
  stage "$1" $PY benchmarks/decode_gpu.py --repeats 2 --out "$OUT/$2.md" --profile "${TMPDIR:-/tmp}/profile_$2" \
    "${@:3}" 2>&1 | tail -26
}
decode "${DECODE_S:-0}" decode
decode "${DECODE_INT8_S:-0}" decode_int8 --quantize int8  # int8 weights: half of bfloat16's bytes per step
# in one process (pytest.ini's two xdist workers would share the GPU, and xdist may not be installed).
# Seen on an H200 (jax 0.11.2): with JAX_DEFAULT_MATMUL_PRECISION=highest the float32 Triton
# gradient did not compile within 35 s (test_flash_causal_packed[None-float32]); without it the
# float32 forward is TF32-accurate (2.1e-4), over the tests' 1e-5; and the float32 model-logits test
# took most of a 60 s stage on an H100. So: the mgpu tests first, then the bfloat16 ones (Triton
# kernels, the whole model's logits, and its gradients at head dim 64, through the Mosaic GPU kernels).
# Of the mgpu tests the backward's quick ones come first; its large test (eager: each small op
# compiled on its own) took 187 s on an H100 and passed, and is left out here. One log for the runs.
for part in mgpu_bwd mgpu rest; do
  case $part in
    mgpu_bwd) pick="mgpu_backward_one or mgpu_backward_lowers"; budget=${TEST_BWD_S:-60};;
    mgpu) pick="mgpu and not test_flash_mgpu_backward"; budget=${TEST_S:-80};;
    rest) pick="bfloat16 and not mgpu and not splash and not tpu and not mosaic"; budget=${TEST_REST_S:-50};;
  esac
  JAX_DEFAULT_MATMUL_PRECISION=highest stage "$budget" env $PY -m pytest -v tests/test_kernels.py -o addopts="" \
    -p no:cacheprovider -o faulthandler_timeout=60 -k "$pick" 2>&1 | tee -a "$OUT/kernel_tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|Timeout|Error"
done
# last, in whatever time is left: decode with the while loop captured as a CUDA graph (XLA command
# buffers), to test whether per-kernel launches are what keeps decode at 67% of the HBM bound
XLA_FLAGS="${CB_FLAGS:---xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL}" decode "${DECODE_CB_S:-0}" \
  decode_command_buffers
