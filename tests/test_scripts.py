"""Every top-level file imports: the scripts no test runs (bench.py, bench_cuda.py) included, so a
name removed from one file cannot leave another failing at its first line. Each says what it holds
in a docstring, and each script has the `main` its last line calls."""
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.py")), ids=lambda path: path.name)
def test_every_top_level_file_imports_and_says_what_it_holds(path):
    module = importlib.import_module(path.stem)
    assert module.__doc__ and module.__doc__.strip(), f"{path.name}: no docstring at the top"
    if 'if __name__ == "__main__":' in path.read_text():
        assert callable(getattr(module, "main", None)), f"{path.name} runs main(), but defines none"
