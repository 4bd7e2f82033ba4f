"""Without a GPU, Triton kernels run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (Triton reads it when a
`@triton.jit` function is defined), so it is set here, ahead of every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
