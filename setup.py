"""Build the compiled core of pystage.

* ``pystage._C``: the op schemas and the CPU kernels; always built.
* ``pystage._C_cuda``: CUDA kernels (``csrc/cuda/*.cu``) and their torch glue;
  built when torch was built with CUDA and a CUDA toolkit (nvcc) is found.
  ``PYSTAGE_NO_CUDA=1`` forces it off, ``PYSTAGE_FORCE_CUDA=1`` forces it on
  (for compiling on a machine without a GPU).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("PYSTAGE_NO_CUDA"):
        return False
    if _flag("PYSTAGE_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extra_cuda_includes() -> list[str]:
    """cuBLAS/cuSPARSE headers shipped in pip's nvidia packages (system toolkits may lack them)."""
    dirs = []
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cublas/include", "nvidia/cusparse/include"):
            path = os.path.join(site, sub)
            if os.path.isdir(path):
                dirs.append(path)
    return dirs


def extensions():
    cxx = ["-O3", "-std=c++17"]
    csrc = os.path.join("csrc")
    cpu_sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    exts = [
        CppExtension(
            "pystage._C",
            cpu_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            py_limited_api=False,
        )
    ]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cuda_sources = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")) + glob.glob(os.path.join(csrc, "cuda", "*.cpp")))
        exts.append(
            CUDAExtension(
                "pystage._C_cuda",
                cuda_sources,
                include_dirs=[os.path.join(HERE, "csrc")] + _extra_cuda_includes(),
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            )
        )
    return exts


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
