#!/usr/bin/env bash
# The checks that need a CUDA device, in one run (issue #11 item 4 and 14): the decoding
# loops at T>0 and greedy identity on the GPU, the Triton kernels natively, and the
# Triton rejection sampler's statistical losslessness test on the GPU.
#   bash tools/gpu_checks.sh            # prints what it ran and the pytest summary
# Needs torch with CUDA, triton and transformers importable; the packages are taken from
# this checkout when they are not installed.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="packages/core/src:packages/train/src:packages/serve/src:.${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' || exit 1
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: these checks need one")
PY
python -m pytest -q -p no:cacheprovider \
  tests/core/test_devices.py \
  "tests/core/test_losslessness.py::test_triton_rejection_sampler_is_lossless" \
  tests/kernels/test_kernels.py 2>&1 | tail -25
