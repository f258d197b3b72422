"""Every Triton kernel compiles ahead of time, without a GPU, for sm_80 (A100) and sm_90 (H100),
with exactly the launches the wrappers make (recorded from them: block sizes, constexprs, warps,
stages, argument specialization), for fp32 and bf16 at the shapes of the tiny space (the other
spaces change only the power-of-two block widths of LayerNorm and attention).

The interpreter runs programs a GPU would reject (a dot under 16 wide, a layout the backend cannot
lower), so this is the check that catches them. @triton.jit becomes the interpreter at import when
TRITON_INTERPRET is set, as conftest.py does without a GPU, so the compiles run in fresh Python processes with
it unset, one per architecture, in parallel. Triton caches the results (~/.triton/cache): the
first run takes one to two minutes on two cores, later ones seconds. .ci/run runs this file a
second time with the oldest Triton the repository supports (requirements.txt)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import aot
from supernet import SPACES

ROOT = Path(__file__).resolve().parents[1]


SCRIPT = """
import json, sys
import aot
rows = [row for row, compiled in aot.compile_layers(json.loads(sys.argv[1]), int(sys.argv[2]))]
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def compiled():
    """{arch: the rows of aot.compile_layers} for sm_80 and sm_90."""
    layers = json.dumps([aot.space_layer(SPACES["tiny"])])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    runs = {arch: subprocess.Popen([sys.executable, "-c", SCRIPT, layers, str(arch)], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for arch in (80, 90)}
    results = {}
    for arch, run in runs.items():
        out, err = run.communicate()
        assert run.returncode == 0, f"sm_{arch}: compilation failed:\n{err[-4000:]}"
        results[arch] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles(compiled, arch):
    import attention
    import kernels
    names = {row["kernel"] for row in compiled[arch]}
    jitted = {name for module in (kernels, attention) for name in vars(module) if name.endswith("_kernel")}
    assert names == jitted, f"launched and compiled {sorted(names)}, defined {sorted(jitted)}"
    for name in ("_matmul_fwd_kernel", "_matmul_bwd_dx_kernel", "_matmul_bwd_dw_kernel"):  # every flag combination
        for dtype in ("float32", "bfloat16"):
            variants = {(r["flags"]["QKV"], r["flags"]["GELU"]) for r in compiled[arch]
                        if r["kernel"] == name and r["dtype"] == dtype}
            assert {(True, False), (False, True), (False, False)} <= variants


def test_register_report():
    """bench.py's table: registers and spills from ptxas for one compiled kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = ("import json, torch, aot; print(json.dumps(aot.register_table([dict(embed_dim=24, "
              "hidden=48, num_heads=1, head_dim=16, num_tokens=17, max_rel=2)], archs=(90,), "
              "dtypes=(torch.bfloat16,))))")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert rows and all(0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 for r in rows)
