"""Test-session setup.

Triton has no CPU backend; its interpreter runs the kernels on CPU tensors. It must be
switched on before any kernel module is imported, so it is set here, for the whole
session, whenever no CUDA device is present (kernels only run when a test asks for them).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
