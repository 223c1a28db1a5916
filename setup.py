"""Builds pddm_ext._C: C++ CPU kernels always, CUDA kernels where CUDA is available.

PDDM_EXT_CUDA=1 forces the CUDA build (e.g. on a machine with a toolkit but no GPU),
PDDM_EXT_CUDA=0 forces the CPU-only build; unset, CUDA is built when torch has CUDA and a
toolkit is found (CUDA_HOME).

PDDM_EXT_CUDA_EMULATION=1 builds the CUDA emulation instead (docs/emulation.md, `make cuda-emulate`):
the kernels of csrc/cuda/ compiled as C++ against csrc/emulation/cuda_emu.h and registered for CPU
tensors in place of the CPU kernels. For testing the CUDA kernels without a GPU, never for use.
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


def want_emulation():
    if os.environ.get("PDDM_EXT_CUDA_EMULATION", "").strip() != "1":
        return False
    if os.environ.get("PDDM_EXT_CUDA", "").strip() == "1":
        raise SystemExit("PDDM_EXT_CUDA_EMULATION=1 and PDDM_EXT_CUDA=1 exclude each other: the emulation build "
                         "registers the CUDA kernels for CPU tensors")
    return True


def emulation_extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/emulation/*.cpp"))
    cxx = ["-O2", "-g0", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-DPDDM_EXT_CUDA_EMULATION"]
    if os.environ.get("PDDM_EXT_TEST_DROP_TILE_BARRIER") == "1":  # the emulation's self-test only
        cxx.append("-DPDDM_EXT_TEST_DROP_TILE_BARRIER")
    if os.environ.get("PDDM_EXT_WERROR") == "1":
        cxx.append("-Werror")
    return cpp_extension.CppExtension("pddm_ext._C", sources, extra_compile_args={"cxx": cxx})


def extension():
    if want_emulation():
        return emulation_extension()
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
