"""Test set-up: Triton's interpreter runs the kernels on the CPU, and it must be chosen before
anything imports triton; the repository root goes on sys.path so the tests import the flat files."""
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
