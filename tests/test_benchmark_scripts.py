"""The benchmark scripts stay runnable: they are not timed here, but a broken one is caught on CPU."""

import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(path.name for path in BENCHMARKS.glob("*.py")))
def test_python_benchmark_compiles(script, tmp_path):
    py_compile.compile(str(BENCHMARKS / script), cfile=str(tmp_path / "compiled.pyc"), doraise=True)


def test_gpu_check_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    done = subprocess.run([bash, "-n", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures for real when CUDA is there")
def test_cuda_step_benchmark_says_there_is_no_gpu():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "real_model.py"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here" in done.stdout
