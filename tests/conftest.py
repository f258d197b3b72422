"""Test set-up. The Triton kernels run compiled on a CUDA device when there is one, and in Triton's
interpreter on the CPU otherwise (or wherever TRITON_INTERPRET=1 is set by hand). The choice must
be made before anything imports triton, which reads TRITON_INTERPRET when a kernel is defined;
importing torch does not import triton. The repository root goes on sys.path so the tests import
the flat files."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
