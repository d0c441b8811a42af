"""Every kernel instance the library can launch compiles for each target architecture without spills.

Runs without a GPU: NVRTC through ``cuda.core`` (cubin output needs no driver), or ``nvcc`` when
cuda.core is missing. ``-Xptxas -v`` output is parsed; any error, or any instance with spill stores or
loads, fails the test, naming the instance.
"""
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from nvrtc_helpers import ptxas_log

from pymglu import cuda as pymglu_cuda
from pymglu.cuda import decode_fused, decode_sample, decode_step, flash_mglu, optimizers, tape_ops, training

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_120")

#: source file -> the name expressions of every instance the library can launch from it (or a function
#: of the architecture that returns them)
INSTANCES = {"flash_mglu.cu": flash_mglu.kernel_names(), "mglu_train.cu": training.kernel_names(),
             "decode_step.cu": decode_step.kernel_names(), "decode_fused.cu": decode_fused.kernel_names,
             "optimizers.cu": optimizers.kernel_names(), "tape_ops.cu": tape_ops.kernel_names(),
             "decode_sample.cu": decode_sample.kernel_names()}


def _compile_nvrtc(source: str, names: list[str], arch: str) -> str:
    return ptxas_log(source, arch, name_expressions=tuple(names), ftz=True)


def _compile_nvcc(path: Path, names: list[str], arch: str, defines: str = "") -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("neither cuda.core (NVRTC) nor nvcc is available")
    # Explicit instantiation of each name expression, through a kernel pointer.
    lines = [defines + f'#include "{path}"']
    lines += [f"static auto* _i{k} = &{name};" for k, name in enumerate(names)]
    with tempfile.TemporaryDirectory() as tmp:
        tu = Path(tmp) / "instances.cu"
        tu.write_text("\n".join(lines) + "\n")
        res = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", "-o",
                              str(Path(tmp) / "k.cubin"), str(tu)], capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed for {arch}:\n{res.stderr[-4000:]}"
    return res.stderr


def _names(source_name: str, arch: str) -> list[str]:
    names = INSTANCES[source_name]
    return names(arch) if callable(names) else names


def _defines(source_name: str) -> str:
    """``#define`` lines for the ``-D`` options the library builds ``source_name`` with."""
    options = flash_mglu.compile_options() if source_name == "flash_mglu.cu" else ()
    assert all(o.startswith("-D") and "=" not in o for o in options), options
    return "".join(f"#define {o[2:]}\n" for o in options)


def _compile(source_name: str, arch: str) -> str:
    path = pymglu_cuda.source_path(source_name)
    names = _names(source_name, arch)
    if os.environ.get("PYMGLU_COMPILE_WITH") != "nvcc":
        try:
            return _compile_nvrtc(_defines(source_name) + path.read_text(), names, arch)
        except pytest.skip.Exception:
            pass
    return _compile_nvcc(path, names, arch, _defines(source_name))


#: sources built for sm_90a only, each checked by its own test
SM90A_ONLY = {"masked_gemm.cu": "test_masked_gemm_compile.py"}


def test_every_source_has_its_instances_listed():
    assert sorted([*INSTANCES, *SM90A_ONLY]) == pymglu_cuda.list_sources()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source_name", sorted(INSTANCES))
def test_compiles_without_spills(source_name, arch):
    log = _compile(source_name, arch)
    entries = re.findall(r"Compiling entry function '(\w+)' for '(\w+)'", log)
    assert len(entries) == len(_names(source_name, arch)), f"expected one entry per instance in the ptxas log:\n{log[:2000]}"
    assert all(a == arch for _, a in entries)
    spills = [(name, stores, loads) for name, stores, loads in re.findall(
        r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads", log, flags=re.S)
        if int(stores) or int(loads)]
    assert not spills, f"register spills on {arch}: {spills}"
