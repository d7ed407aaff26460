"""Builds fused_optim._C: the CPU kernels always, the CUDA kernels when both a CUDA toolkit and
a CUDA-enabled torch are present (torch's CUDA extension helpers refuse a CPU-only torch).

FUSED_OPTIM_CUDA=0 forces a CPU-only build; FUSED_OPTIM_CUDA=1 makes a missing toolkit an error.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("FUSED_OPTIM_CUDA")
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if forced == "0":
        return False
    if forced == "1" and not have:
        raise RuntimeError(
            "FUSED_OPTIM_CUDA=1 but "
            + ("torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit found")
        )
    return have


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    # -fno-math-errno lets sqrtf vectorise; -fopenmp because at::parallel_for is an inline
    # OpenMP loop in the ATen headers (it would silently run on one thread without it).
    cxx = ["-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=["-fopenmp"],
    )
    if _want_cuda():
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        nvcc = ["-O3", "-std=c++17", "-DFO_WITH_CUDA"]  # no fast-math: exact sqrt/div like the CPU kernels
        return cpp_extension.CUDAExtension(
            "fused_optim._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DFO_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    return cpp_extension.CppExtension("fused_optim._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
