"""The build backend of pddm-ext (PEP 517): setuptools' backend, built against the torch the user has.

A C++ extension of torch must be compiled against the torch it will be imported with. A build
requirement ``torch`` in pyproject.toml would make pip install a second, arbitrary torch (the newest
on the index) into its isolated build environment and compile against that one. So pyproject.toml
requests only the build tools (setuptools, wheel, ninja), and this module, which pip imports from the
source tree (``backend-path``), finds the torch of the environment being installed into and puts its
site directory at the end of ``sys.path`` before setuptools runs setup.py. docs/install.md says why
and what this does under pip, ``python -m build`` and uv.

Where the torch is looked for: the torch this process can import, if any (a build without isolation,
or a frontend that put torch into its build environment); else (``torch_candidates``) the interpreter
running the backend, as it runs without the frontend's isolation (pip runs the backend with the interpreter of the target
environment and hides that environment's site-packages only through PYTHONPATH and a
sitecustomize), then the activated environment (``VIRTUAL_ENV``, ``CONDA_PREFIX``) when it is another
one of the same Python (``python -m build`` and uv build in a fresh environment of their own).

The rest of the module decides what to build and stops a build that cannot succeed with one line
naming what is missing (``BuildStop``): no torch, a torch below the floor, no C++ compiler, CUDA forced
without a CUDA torch, a toolkit, a matching toolkit or an architecture. The decisions are pure
functions of the facts they are given, so that they are tested without the machines they describe.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Callable, NamedTuple, Optional, Sequence

TORCH_FLOOR = (2, 4)
PREFIX = "pddm-ext: "
# The command that rebuilds from a checkout, as every message names it.
INSTALL = "pip install ."


class BuildStop(SystemExit):
    """A build that cannot succeed: the one line that says what is missing and what to install.

    A SystemExit, so that the PEP 517 hook process exits with this line on stderr and no traceback."""

    def __init__(self, message: str):
        super().__init__(PREFIX + message)
        self.message = message


# ---- Finding the user's torch --------------------------------------------------------------------

# Run by a candidate interpreter without the frontend's PYTHONPATH: where its torch lies and which
# version its metadata gives, without importing torch (fast, and safe if torch is broken).
PROBE = r"""
import importlib.metadata, importlib.util, json, sys
out = {"cache_tag": sys.implementation.cache_tag, "prefix": sys.prefix}
try:
    spec = importlib.util.find_spec("torch")
except Exception:
    spec = None
if spec is not None and spec.submodule_search_locations:
    out["torch_dir"] = list(spec.submodule_search_locations)[0]
    try:
        out["version"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        out["version"] = None
print(json.dumps(out))
"""

# Set by frontends to isolate the build; removed when the user's interpreter is asked.
ISOLATION_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")


class TorchLocation(NamedTuple):
    python: str  # the interpreter whose environment holds it
    site_dir: str  # the directory that holds the torch package (appended to sys.path)
    version: Optional[str]  # from the distribution's metadata, e.g. "2.13.0+cpu"


def _python_of(prefix: str) -> str:
    if os.name == "nt":
        return os.path.join(prefix, "python.exe")
    return os.path.join(prefix, "bin", "python")


def torch_candidates(executable: str, prefix: str, environ) -> list:
    """The interpreters to ask for a torch, in order: the one running the build, then the activated
    virtual or conda environment when it is another one."""
    found = [executable]
    for variable in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        root = environ.get(variable)
        if root and os.path.realpath(root) != os.path.realpath(prefix):
            python = _python_of(root)
            if os.path.exists(python) and python not in found:
                found.append(python)
    return found


def probe_interpreter(python: str, environ) -> Optional[dict]:
    """What PROBE prints when run by `python` with the isolation variables removed (None when it cannot run)."""
    env = {k: v for k, v in environ.items() if k not in ISOLATION_VARIABLES}
    try:
        done = subprocess.run([python, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def locate_torch(candidates: Sequence[str], probe: Callable[[str], Optional[dict]], cache_tag: str,
                 under_uv: bool = False) -> TorchLocation:
    """The first candidate interpreter of this Python (same `cache_tag`, e.g. cpython-311) that has
    torch; BuildStop when none has, naming the command that works (`under_uv`: the frontend is uv,
    which builds in an environment of its own and says nowhere which environment it installs into)."""
    asked = []
    for python in candidates:
        facts = probe(python)
        if not facts or facts.get("cache_tag") != cache_tag:
            continue
        asked.append(python)
        if facts.get("torch_dir"):
            return TorchLocation(python, os.path.dirname(facts["torch_dir"]), facts.get("version"))
    where = " or ".join(asked) if asked else candidates[0]
    if under_uv:
        raise BuildStop(
            f"builds against the torch already installed, and uv's build environment ({where}) has none: run "
            "`uv pip install .` from the checkout (its pyproject.toml has uv put the environment's torch version "
            "into the build), or `uv pip install --no-build-isolation <checkout>` with setuptools in the environment")
    raise BuildStop(
        f"builds against the torch already installed, and {where} has none: install torch first "
        f"(pip install torch), then {INSTALL} (python -m build builds in an environment of its own: run it "
        "with the environment that has torch activated, or with --no-isolation)")


def parse_version(version: str) -> tuple:
    """(major, minor) of a torch version string such as '2.4.1+cu121' or '2.13.0.dev20260101'."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    if not match:
        raise BuildStop(f"cannot read the torch version {version!r}: reinstall torch (pip install --force-reinstall torch)")
    return int(match.group(1)), int(match.group(2))


def check_torch_floor(version: str, where: str) -> None:
    if parse_version(version) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise BuildStop(f"needs torch >= {floor}, and the environment has torch {version} ({where}): "
                        f"upgrade it (pip install 'torch>={floor}'), then {INSTALL}")


_located: Optional[TorchLocation] = None


def use_environment_torch() -> TorchLocation:
    """Finds the user's torch, makes it importable here (its site directory appended to sys.path, after
    the build environment's own packages) and checks that the torch imported is the one found and is
    not below the floor. Once per process."""
    global _located
    if _located is not None:
        return _located
    # Importable here already: a build without isolation (--no-build-isolation, setup.py, a torch on
    # PYTHONPATH), or a frontend that put torch into its build environment (uv's match-runtime).
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.submodule_search_locations:
        try:
            version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            version = None
        location = TorchLocation(sys.executable, os.path.dirname(list(spec.submodule_search_locations)[0]), version)
    else:
        location = locate_torch(torch_candidates(sys.executable, sys.prefix, os.environ),
                                lambda python: probe_interpreter(python, os.environ), sys.implementation.cache_tag,
                                under_uv="UV" in os.environ)
    if location.site_dir not in sys.path:
        sys.path.append(location.site_dir)
    if location.version is not None:
        check_torch_floor(location.version, location.site_dir)
    import torch

    imported = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    # The metadata's version may lack the local part torch.__version__ has (PyPI's 2.4.1 wheel: "2.4.1"
    # and "2.4.1+cu121").
    if os.path.realpath(imported) != os.path.realpath(location.site_dir) or (
            location.version is not None and torch.__version__.split("+")[0] != location.version.split("+")[0]):
        raise BuildStop(f"found torch {location.version} in {location.site_dir} but imported torch "
                        f"{torch.__version__} from {imported}: remove one of them, then {INSTALL}")
    check_torch_floor(torch.__version__, location.site_dir)
    _located = location
    return location


# ---- What to build -------------------------------------------------------------------------------


class Plan(NamedTuple):
    kind: str  # "cpu", "cuda" or "emulation"
    note: str  # the one line that says what is built and why


def parse_nvcc_release(text: str) -> Optional[tuple]:
    """(major, minor) from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    match = re.search(r"release (\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def toolkit_version(cuda_home: Optional[str]) -> Optional[tuple]:
    """The release of the nvcc in cuda_home/bin, or None when there is none that runs."""
    if not cuda_home:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc.exe" if os.name == "nt" else "nvcc")
    if not os.path.exists(nvcc):
        return None
    try:
        done = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvcc_release(done.stdout)


def check_compiler(environ, which: Callable[[str], Optional[str]], platform: str = sys.platform) -> None:
    """The C++ compiler torch's extension builder will call ($CXX, else c++) must exist."""
    if platform.startswith("win"):
        return  # MSVC is found by setuptools itself
    compiler = (environ.get("CXX") or "c++").split()[0]
    if which(compiler) is None:
        raise BuildStop(f"no C++ compiler found ({compiler!r} is not on PATH; CXX names another): install one "
                        f"(Debian/Ubuntu: apt-get install g++; conda: conda install gxx), then {INSTALL}")


def choose_kernels(environ, torch_version: str, torch_cuda: Optional[str], cuda_home: Optional[str],
                   toolkit: Optional[tuple], gpu_count: int) -> Plan:
    """Which kernels to build, from PDDM_EXT_CUDA / PDDM_EXT_CUDA_EMULATION / TORCH_CUDA_ARCH_LIST in
    `environ`, the torch (its version and CUDA version, None for a CPU build), the toolkit found
    (CUDA_HOME and its nvcc release, None when there is none), and the number of visible GPUs.

    PDDM_EXT_CUDA unset builds the CUDA kernels only when all of them are there (a CUDA torch, a toolkit
    of its CUDA major version, an architecture from a GPU or TORCH_CUDA_ARCH_LIST), else the CPU kernels,
    and says why; PDDM_EXT_CUDA=1 stops where one is missing (BuildStop); PDDM_EXT_CUDA=0 builds the
    CPU kernels."""
    flag = environ.get("PDDM_EXT_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise BuildStop(f"PDDM_EXT_CUDA must be 1 (CUDA kernels), 0 (CPU only) or unset (CUDA where possible), "
                        f"not {flag!r}")
    if environ.get("PDDM_EXT_CUDA_EMULATION", "").strip() == "1":
        if flag == "1":
            raise BuildStop("PDDM_EXT_CUDA_EMULATION=1 and PDDM_EXT_CUDA=1 exclude each other: the emulation "
                            "build registers the CUDA kernels for CPU tensors")
        return Plan("emulation", "building the CUDA emulation (PDDM_EXT_CUDA_EMULATION=1): for tests only")
    if flag == "0":
        return Plan("cpu", "building the CPU kernels only (PDDM_EXT_CUDA=0)")
    forced = flag == "1"
    arch_list = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    cpu = "building the CPU kernels only"
    if torch_cuda is None:
        if forced:
            raise BuildStop(f"PDDM_EXT_CUDA=1 needs a CUDA build of torch, and torch {torch_version} is a CPU "
                            "build: install a CUDA build of torch (pytorch.org lists them), or unset PDDM_EXT_CUDA")
        return Plan("cpu", f"{cpu} (torch {torch_version} is a CPU build)")
    torch_major = parse_version(torch_cuda)[0]
    if toolkit is None:
        if forced:
            raise BuildStop(f"PDDM_EXT_CUDA=1 but no CUDA toolkit was found (no nvcc in CUDA_HOME, on PATH or in "
                            f"/usr/local/cuda): install the CUDA {torch_major} toolkit (torch {torch_version} is "
                            f"built for CUDA {torch_cuda}) and set CUDA_HOME to it")
        return Plan("cpu", f"{cpu} (no CUDA toolkit found; the CUDA kernels need the CUDA {torch_major} "
                           "toolkit in CUDA_HOME)")
    if toolkit[0] != torch_major:
        line = (f"the CUDA toolkit in {cuda_home} is CUDA {toolkit[0]}.{toolkit[1]}, and torch {torch_version} is "
                f"built for CUDA {torch_cuda}")
        if forced:
            raise BuildStop(f"{line}: install the CUDA {torch_major} toolkit and set CUDA_HOME to it, or install a "
                            f"torch built for CUDA {toolkit[0]}")
        return Plan("cpu", f"{cpu} ({line}; the CUDA kernels need the CUDA {torch_major} toolkit in CUDA_HOME)")
    if not arch_list and gpu_count == 0:
        if forced:
            raise BuildStop("PDDM_EXT_CUDA=1 but no GPU is visible to take the architectures from: set "
                            "TORCH_CUDA_ARCH_LIST to the compute capabilities to build for "
                            "(e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0')")
        return Plan("cpu", f"{cpu} (no GPU visible and TORCH_CUDA_ARCH_LIST unset; set TORCH_CUDA_ARCH_LIST, "
                           "e.g. '8.0;9.0', or build where the GPU is, for the CUDA kernels)")
    archs = f"TORCH_CUDA_ARCH_LIST={arch_list}" if arch_list else f"the {gpu_count} visible GPU(s)"
    return Plan("cuda", f"building the CPU and CUDA kernels (CUDA {toolkit[0]}.{toolkit[1]} toolkit in "
                        f"{cuda_home}, architectures of {archs})")


_plan: Optional[Plan] = None


def plan_build() -> Plan:
    """The Plan for this machine: the user's torch found and checked, the compiler, the toolkit and the
    GPUs looked at. Once per process; BuildStop when the build cannot succeed."""
    global _plan
    if _plan is not None:
        return _plan
    use_environment_torch()
    import torch

    # torch's builder prints "No CUDA runtime is found, using CUDA_HOME=..." on import on a machine
    # without a GPU: the plan's own line says what is built and why.
    with contextlib.redirect_stderr(io.StringIO()):
        from torch.utils import cpp_extension

    check_compiler(os.environ, shutil.which)
    cuda_home = cpp_extension.CUDA_HOME if torch.version.cuda is not None else None
    gpus = torch.cuda.device_count() if torch.version.cuda is not None else 0
    _plan = choose_kernels(os.environ, torch.__version__, torch.version.cuda, cuda_home,
                           toolkit_version(cuda_home), gpus)
    return _plan


# ---- The record of the build, read at import ------------------------------------------------------

BUILD_INFO = "_build_info.json"


def build_info(kind: str, extension_file: str) -> dict:
    """What pddm_ext checks before it loads _C (pddm_ext/_extension.py): the torch the extension was
    compiled against and the file it describes."""
    import torch

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "kernels": kind,
            "extension": os.path.basename(extension_file), "size": os.path.getsize(extension_file)}


# ---- The PEP 517 hooks ---------------------------------------------------------------------------

# Whether setup.py, when run by a hook of this process, builds the extension (False for the sdist,
# which carries the sources only) and prints the plan's line (only the hooks that build).
state = {"extension": True, "announce": True}


def _setuptools():
    from setuptools import build_meta

    return build_meta


def get_requires_for_build_wheel(config_settings=None):
    # Decided here, the first hook pip calls, so that a build that cannot succeed stops within seconds.
    # Nothing to add to pyproject.toml's requires: torch is the environment's.
    plan_build()
    return []


def get_requires_for_build_editable(config_settings=None):
    return get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    plan_build()
    state["announce"] = False
    return _setuptools().prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    plan_build()
    state["announce"] = False
    return _setuptools().prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    plan_build()
    state["announce"] = True
    return _setuptools().build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    plan_build()
    state["announce"] = True
    return _setuptools().build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    state["extension"] = False
    return _setuptools().build_sdist(sdist_directory, config_settings)
