"""Every top-level file imports: the scripts no test runs (bench.py, bench_cuda.py) included, so a
name removed from one file cannot leave another failing at its first line."""
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(path.stem for path in ROOT.glob("*.py")))
def test_every_top_level_file_imports(name):
    importlib.import_module(name)
