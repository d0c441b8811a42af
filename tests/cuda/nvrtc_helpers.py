"""NVRTC through ``cuda.core`` for the CPU compile tests: a source compiled to a cubin, ptxas's ``-v`` log
returned. The test is skipped where cuda.core is missing."""
import pytest

from pymglu import cuda as pymglu_cuda


def ptxas_log(source: str, arch: str, *, name_expressions: tuple[str, ...] = (), ftz: bool = False,
              cudart_headers: bool = True) -> str:
    """ptxas's verbose log for ``source`` compiled for ``arch`` (``-std=c++17``; ``pymglu/cuda`` and, with
    ``cudart_headers``, the CUDA runtime's headers on the include path)."""
    core = pytest.importorskip("cuda.core")
    include = [str(pymglu_cuda.source_dir())]
    if cudart_headers:
        import cuda.pathfinder

        include.insert(0, cuda.pathfinder.find_nvidia_header_directory("cudart"))
    options = core.ProgramOptions(arch=arch, std="c++17", ftz=ftz, include_path=include, ptxas_options=["-v"])

    class Log:
        text = ""

        def write(self, s):
            self.text += s

    log = Log()
    core.Program(source, "c++", options=options).compile("cubin", name_expressions=tuple(name_expressions), logs=log)
    return log.text
