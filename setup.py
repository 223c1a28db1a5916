"""Builds pddm_ext._C: C++ CPU kernels always, CUDA kernels where CUDA is available.

PDDM_EXT_CUDA=1 forces the CUDA build (e.g. on a machine with a toolkit but no GPU),
PDDM_EXT_CUDA=0 forces the CPU-only build; unset, CUDA is built when torch has CUDA and a
toolkit is found (CUDA_HOME).
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    flag = os.environ.get("PDDM_EXT_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if os.environ.get("PDDM_EXT_WERROR") == "1":
        cxx.append("-Werror")
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if want_cuda() and cuda_sources:
        kwargs["extra_compile_args"]["cxx"].append("-DPDDM_EXT_WITH_CUDA")
        nvcc = ["-O3", "-DPDDM_EXT_WITH_CUDA", "--expt-relaxed-constexpr"]
        if os.environ.get("PDDM_EXT_WERROR") == "1":
            nvcc += ["-Werror=all-warnings", "-Xcompiler=-Wall,-Werror,-Wno-unused-parameter"]
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        return cpp_extension.CUDAExtension("pddm_ext._C", sources + cuda_sources, **kwargs)
    return cpp_extension.CppExtension("pddm_ext._C", sources, **kwargs)


setup(
    packages=find_packages(include=["pddm_ext", "pddm_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
