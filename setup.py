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
import shutil
import sys

from setuptools import setup

import torch


def _fix_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit when torch's guess would miss it.

    Without CUDA_HOME/CUDA_PATH, torch takes the parent of the parent of `which nvcc`; a wrapper script such as
    /usr/local/bin/nvcc makes that /usr/local, which has no CUDA headers or libraries. Only then, use
    /usr/local/cuda (or the newest /usr/local/cuda-*) if it holds a toolkit. Must run before cpp_extension loads.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None or os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include", "cuda_runtime_api.h")):
        return
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")) and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


_fix_cuda_home()

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

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


def _cxx_std() -> str:
    """torch >= 2.14 headers require C++20 (ATen.h #errors otherwise); older ones build as C++17."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def _openmp_flags() -> list[str]:
    """-fopenmp where torch's intra-op backend is OpenMP (Linux wheels): ``at::parallel_for`` in our kernels is an
    inline template that runs serially unless _OPENMP is defined where it is compiled. The GOMP symbols resolve
    to the OpenMP runtime torch has already loaded (nothing is linked here), so there is one thread pool."""
    if sys.platform == "darwin" or os.environ.get("PYSTAGE_NO_OPENMP") or not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"]


def extensions():
    cxx = ["-O3", _cxx_std(), *_openmp_flags()]
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
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", _cxx_std()]},
            )
        )
    return exts


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
