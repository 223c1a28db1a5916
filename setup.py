"""Builds pddm_ext._C: C++ CPU kernels always, CUDA kernels where CUDA is available.

Run by the build backend build_backend/pddm_ext_build.py (`pip install .`), which finds the torch of
the environment being installed into and decides what to build (``plan_build``; docs/install.md);
`python setup.py build_ext --inplace` (the Makefile's CUDA and emulation builds) uses the same
decisions with the torch of the interpreter that runs it.

PDDM_EXT_CUDA=1 forces the CUDA build (e.g. on a machine with a toolkit but no GPU, with
TORCH_CUDA_ARCH_LIST set), PDDM_EXT_CUDA=0 forces the CPU-only build; unset, CUDA is built when torch
has CUDA, a toolkit of its CUDA major version is found (CUDA_HOME) and an architecture is known (a
visible GPU or TORCH_CUDA_ARCH_LIST); otherwise the CPU kernels, with one line saying why.

PDDM_EXT_CUDA_EMULATION=1 builds the CUDA emulation instead (docs/emulation.md, `make cuda-emulate`):
the kernels of csrc/cuda/ compiled as C++ against csrc/emulation/cuda_emu.h and registered for CPU
tensors in place of the CPU kernels. For testing the CUDA kernels without a GPU, never for use.

Next to the extension the build writes pddm_ext/_build_info.json (the torch it was compiled against),
which ``import pddm_ext`` checks before it loads the extension (pddm_ext/_extension.py).
"""

import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "build_backend"))

import pddm_ext_build  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402


def werror():
    return os.environ.get("PDDM_EXT_WERROR") == "1"


def emulation_extension(cpp_extension):
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/emulation/*.cpp"))
    cxx = ["-O2", "-g0", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-DPDDM_EXT_CUDA_EMULATION"]
    if os.environ.get("PDDM_EXT_TEST_DROP_TILE_BARRIER") == "1":  # the emulation's self-test only
        cxx.append("-DPDDM_EXT_TEST_DROP_TILE_BARRIER")
    if os.environ.get("PDDM_EXT_TEST_DROP_COPY_WAIT") == "1":  # the emulation's self-test only
        cxx.append("-DPDDM_EXT_TEST_DROP_COPY_WAIT")
    if werror():
        cxx.append("-Werror")
    return cpp_extension.CppExtension("pddm_ext._C", sources, extra_compile_args={"cxx": cxx})


def extension(plan, cpp_extension):
    if plan.kind == "emulation":
        return emulation_extension(cpp_extension)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if werror():
        cxx.append("-Werror")
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if plan.kind == "cuda" and cuda_sources:
        kwargs["extra_compile_args"]["cxx"].append("-DPDDM_EXT_WITH_CUDA")
        nvcc = ["-O3", "-DPDDM_EXT_WITH_CUDA", "--expt-relaxed-constexpr"]
        if werror():
            nvcc += ["-Werror=all-warnings", "-Xcompiler=-Wall,-Werror,-Wno-unused-parameter"]
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        return cpp_extension.CUDAExtension("pddm_ext._C", sources + cuda_sources, **kwargs)
    return cpp_extension.CppExtension("pddm_ext._C", sources, **kwargs)


def build_ext_class(plan, cpp_extension):
    """torch's BuildExtension (ninja), writing pddm_ext/_build_info.json next to the extension wherever
    it is put: the build directory, and the source tree for --inplace and editable installs."""

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        def build_extension(self, ext):
            target = self.get_ext_fullpath(ext.name)
            info_path = os.path.join(os.path.dirname(target), pddm_ext_build.BUILD_INFO)
            # An extension left from a build against another torch is rebuilt, not reused as up to date.
            import torch

            if os.path.exists(target) and self._recorded_torch(info_path) != torch.__version__:
                self.force = True
            super().build_extension(ext)
            self._write_info(target)

        @staticmethod
        def _recorded_torch(info_path):
            try:
                with open(info_path) as f:
                    return json.load(f).get("torch")
            except (OSError, ValueError):
                return None

        def _write_info(self, extension_file):
            with open(os.path.join(os.path.dirname(extension_file), pddm_ext_build.BUILD_INFO), "w") as f:
                json.dump(pddm_ext_build.build_info(plan.kind, extension_file), f, indent=1)
                f.write("\n")

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            package_dir = self.get_finalized_command("build_py").get_package_dir("pddm_ext")
            for ext in self.extensions:
                name = os.path.basename(self.get_ext_filename(ext.name))
                self._write_info(os.path.join(package_dir, name))

    return BuildExtension


def build_options():
    if not pddm_ext_build.state["extension"]:  # the sdist: sources only (MANIFEST.in), no torch needed
        return {}
    plan = pddm_ext_build.plan_build()
    if pddm_ext_build.state["announce"]:
        print(pddm_ext_build.PREFIX + plan.note, flush=True)
    from torch.utils import cpp_extension

    return {"ext_modules": [extension(plan, cpp_extension)],
            "cmdclass": {"build_ext": build_ext_class(plan, cpp_extension)}}


setup(packages=find_packages(include=["pddm_ext", "pddm_ext.*"]), **build_options())
