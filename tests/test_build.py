"""The build backend's decisions (build_backend/pddm_ext_build.py) and the import-time check of the
extension's build record (pddm_ext/_extension.py). The decisions are pure functions fed the facts of
machines this one is not (a toolkit without a GPU, a toolkit of another CUDA major version, no
compiler, an old torch); the end-to-end `pip install .` runs in CI (Makefile: pip-check, oldest-torch)."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import pddm_ext
from pddm_ext import _extension

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_backend"))
import pddm_ext_build as backend  # noqa: E402

TOOLKIT_13 = "/usr/local/cuda-13.0"


def choose(env=None, torch_version="2.14.1", torch_cuda="13.0", cuda_home=TOOLKIT_13, toolkit=(13, 0), gpus=0):
    return backend.choose_kernels(env or {}, torch_version, torch_cuda, cuda_home, toolkit, gpus)


def stop_line(call, *args, **kwargs):
    with pytest.raises(backend.BuildStop) as stop:
        call(*args, **kwargs)
    message = str(stop.value)
    assert "\n" not in message and message.startswith("pddm-ext: "), message
    return message


# ---- what the build requests ----------------------------------------------------------------------


def test_the_build_requests_no_torch():
    # [build-system] as TOML would read it (tomllib is 3.11+, the package supports 3.10)
    block = (ROOT / "pyproject.toml").read_text().split("[build-system]\n", 1)[1].split("\n[", 1)[0]
    system = {key: ast.literal_eval(value) for key, value in re.findall(r"^([a-z-]+) = (.+)$", block, re.M)}
    assert system["requires"] and not [r for r in system["requires"] if r.lower().startswith("torch")], system
    assert system["build-backend"] == "pddm_ext_build" and system["backend-path"] == ["build_backend"]
    assert backend.get_requires_for_build_sdist() == []


# ---- toolkit, GPU, architectures --------------------------------------------------------------------


def test_a_toolkit_without_gpu_or_arch_list_builds_the_cpu_kernels_and_says_so():
    plan = choose()
    assert plan.kind == "cpu"
    assert "\n" not in plan.note and "no GPU visible" in plan.note and "TORCH_CUDA_ARCH_LIST" in plan.note


def test_cuda_forced_without_gpu_or_arch_list_stops_naming_torch_cuda_arch_list():
    message = stop_line(choose, {"PDDM_EXT_CUDA": "1"})
    assert "TORCH_CUDA_ARCH_LIST" in message and "no GPU" in message


def test_an_arch_list_or_a_gpu_builds_the_cuda_kernels():
    assert choose({"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}).kind == "cuda"
    assert choose({"PDDM_EXT_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"}).kind == "cuda"
    plan = choose(gpus=1)
    assert plan.kind == "cuda" and "1 visible GPU" in plan.note
    assert choose({"PDDM_EXT_CUDA": "0"}, gpus=1).kind == "cpu"


def test_a_toolkit_of_another_cuda_major_version_is_one_line():
    plan = choose({"TORCH_CUDA_ARCH_LIST": "9.0"}, torch_version="2.4.1+cu121", torch_cuda="12.1")
    assert plan.kind == "cpu" and "CUDA 13.0" in plan.note and "CUDA 12.1" in plan.note
    message = stop_line(choose, {"PDDM_EXT_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"},
                        torch_version="2.4.1+cu121", torch_cuda="12.1")
    assert "CUDA 13.0" in message and "install the CUDA 12 toolkit" in message
    # a minor version apart is what torch itself accepts
    assert choose({"TORCH_CUDA_ARCH_LIST": "9.0"}, torch_cuda="13.1").kind == "cuda"


def test_cuda_forced_without_a_toolkit_stops_naming_the_toolkit_to_install():
    message = stop_line(choose, {"PDDM_EXT_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"}, cuda_home=None, toolkit=None,
                        torch_cuda="12.8")
    assert "no CUDA toolkit" in message and "install the CUDA 12 toolkit" in message and "CUDA_HOME" in message
    plan = choose({"TORCH_CUDA_ARCH_LIST": "9.0"}, cuda_home=None, toolkit=None)
    assert plan.kind == "cpu" and "no CUDA toolkit" in plan.note


def test_cuda_forced_with_a_cpu_torch_stops():
    message = stop_line(choose, {"PDDM_EXT_CUDA": "1"}, torch_version="2.13.0+cpu", torch_cuda=None)
    assert "CPU build" in message and "2.13.0+cpu" in message
    assert choose(torch_version="2.13.0+cpu", torch_cuda=None).kind == "cpu"


def test_pddm_ext_cuda_takes_0_1_or_nothing_and_the_emulation_excludes_cuda():
    assert "'yes'" in stop_line(choose, {"PDDM_EXT_CUDA": "yes"})
    assert choose({"PDDM_EXT_CUDA_EMULATION": "1"}).kind == "emulation"
    assert "exclude each other" in stop_line(choose, {"PDDM_EXT_CUDA_EMULATION": "1", "PDDM_EXT_CUDA": "1"})


def test_nvcc_release_is_read_from_its_version_text():
    text = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
    assert backend.parse_nvcc_release(text) == (13, 0)
    assert backend.parse_nvcc_release("release 12.10, V12.10.1") == (12, 10)
    assert backend.parse_nvcc_release("garbage") is None
    assert backend.toolkit_version(None) is None


# ---- torch floor, compiler ------------------------------------------------------------------------


def test_a_torch_below_the_floor_stops_naming_the_floor():
    message = stop_line(backend.check_torch_floor, "2.3.1+cu121", "/env/site-packages")
    assert "torch >= 2.4" in message and "2.3.1+cu121" in message and "pip install 'torch>=2.4'" in message
    for version in ("2.4.0", "2.4.1+cu121", "2.13.0+cpu", "3.0.0.dev20270101"):
        backend.check_torch_floor(version, "")  # 2.13 is above 2.4 (not a string comparison)


def test_a_missing_compiler_stops_naming_what_to_install():
    message = stop_line(backend.check_compiler, {}, lambda name: None, "linux")
    assert "'c++'" in message and "apt-get install g++" in message
    seen = []
    backend.check_compiler({"CXX": "clang++ -stdlib=libc++"}, lambda name: seen.append(name) or "/usr/bin/" + name, "linux")
    assert seen == ["clang++"]


# ---- finding the environment's torch --------------------------------------------------------------


def test_locate_torch_takes_the_first_interpreter_of_this_python_that_has_torch(tmp_path):
    facts = {
        "/build-env/bin/python": {"cache_tag": "cpython-311"},
        "/other-python/bin/python": {"cache_tag": "cpython-312", "torch_dir": "/x/torch", "version": "2.13.0"},
        "/user-env/bin/python": {"cache_tag": "cpython-311", "torch_dir": "/user-env/site/torch", "version": "2.4.1"},
    }
    found = backend.locate_torch(list(facts), facts.get, "cpython-311")
    assert found == backend.TorchLocation("/user-env/bin/python", "/user-env/site", "2.4.1")


def test_no_torch_anywhere_stops_with_install_torch_first():
    message = stop_line(backend.locate_torch, ["/env/bin/python"], lambda python: {"cache_tag": "cpython-311"},
                        "cpython-311")
    assert "install torch first (pip install torch), then pip install ." in message and "/env/bin/python" in message
    message = stop_line(backend.locate_torch, ["/uv-build/bin/python"], lambda python: {"cache_tag": "cpython-311"},
                        "cpython-311", under_uv=True)
    assert "`uv pip install .` from the checkout" in message and "--no-build-isolation" in message


def test_the_activated_environment_is_a_candidate_when_it_is_another_one(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert backend.torch_candidates("/build/bin/python", "/build", {"VIRTUAL_ENV": str(venv)}) == [
        "/build/bin/python", str(venv / "bin" / "python")]
    assert backend.torch_candidates(str(venv / "bin" / "python"), str(venv), {"VIRTUAL_ENV": str(venv)}) == [
        str(venv / "bin" / "python")]
    assert backend.torch_candidates("/build/bin/python", "/build", {}) == ["/build/bin/python"]


def test_the_probe_ignores_the_frontends_pythonpath(tmp_path):
    # pip hides the target environment through PYTHONPATH (a sitecustomize); a torch on PYTHONPATH must
    # not be taken for the environment's.
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '0.0.1'\n")
    facts = backend.probe_interpreter(sys.executable, {**os.environ, "PYTHONPATH": str(tmp_path)})
    assert facts["cache_tag"] == sys.implementation.cache_tag
    assert pathlib.Path(facts["torch_dir"]) == pathlib.Path(torch.__file__).parent
    assert facts["version"].split("+")[0] == torch.__version__.split("+")[0]


def test_the_backend_in_an_isolated_interpreter_finds_and_imports_the_environments_torch(tmp_path):
    # What pip does: the target environment's interpreter with its site-packages removed from sys.path
    # (here: python -S, no site directory at all) and the backend on the path.
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'build_backend')!r})
        assert "torch" not in sys.modules
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch importable before the backend ran")
        import pddm_ext_build
        location = pddm_ext_build.use_environment_torch()
        import torch
        print(torch.__version__, torch.__file__)
    """)
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    version, where = done.stdout.split()
    assert version == torch.__version__ and pathlib.Path(where) == pathlib.Path(torch.__file__)


def test_a_torch_importable_without_isolation_is_used_even_from_pythonpath(tmp_path):
    # --no-build-isolation or setup.py with torch on PYTHONPATH (e.g. a cluster's module system): the
    # torch this process imports is the one, though the interpreter's own environment has none.
    site_dir = str(pathlib.Path(torch.__file__).parents[1])
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'build_backend')!r})
        import pddm_ext_build
        location = pddm_ext_build.use_environment_torch()
        print(location.site_dir)
    """)
    base = getattr(sys, "_base_executable", sys.executable)
    done = subprocess.run([base, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": site_dir})
    assert done.returncode == 0, done.stderr
    assert pathlib.Path(done.stdout.strip()) == pathlib.Path(site_dir)


# ---- the build record checked at import -----------------------------------------------------------


def test_mismatch_message_names_both_torches_and_the_rebuild_command():
    info = {"torch": "2.4.1+cu121", "torch_cuda": "12.1"}
    assert _extension.mismatch_message({"torch": "2.13.0+cpu", "torch_cuda": None}, "2.13.0+cpu", None, "x.so") is None
    message = _extension.mismatch_message(info, "2.13.0+cpu", None, "/site/pddm_ext/_C.so")
    assert "\n" not in message
    assert "torch 2.4.1+cu121 (CUDA 12.1)" in message and "torch 2.13.0+cpu (CPU)" in message
    assert "pip install ." in message and "/site/pddm_ext/_C.so" in message
    # the same version, the other variant
    assert _extension.mismatch_message({"torch": "2.13.0", "torch_cuda": "12.8"}, "2.13.0", None, "x.so")


def test_a_record_that_does_not_describe_the_extension_is_not_used(tmp_path):
    so = tmp_path / "_C.so"
    so.write_bytes(b"1234")
    info = {"torch": "1", "torch_cuda": None, "extension": "_C.so", "size": 4}
    (tmp_path / "_build_info.json").write_text(json.dumps(info))
    assert _extension.read_info(str(so)) == info
    so.write_bytes(b"12345")  # another build copied over the extension alone
    assert _extension.read_info(str(so)) is None
    (tmp_path / "_build_info.json").write_text("{not json")
    assert _extension.read_info(str(so)) is None


def _package_copy(tmp_path, record):
    """A copy of the pddm_ext package with its compiled extension and `record` as its build record."""
    source = pathlib.Path(pddm_ext.__file__).parent
    extension = pathlib.Path(pddm_ext._C.__file__)
    target = tmp_path / "pddm_ext"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "_build_info.json", "_C*.so"))
    shutil.copy2(extension, target / extension.name)
    if record is not None:
        record = {"extension": extension.name, "size": extension.stat().st_size, "kernels": "cpu", **record}
        (target / "_build_info.json").write_text(json.dumps(record))
    return target


IMPORT_AND_REPORT = """
import sys
try:
    import pddm_ext
except ImportError as error:
    print("ImportError:", error)
print("loaded:", "pddm_ext._C" in sys.modules)
"""


def _import_copy(tmp_path):
    done = subprocess.run([sys.executable, "-c", IMPORT_AND_REPORT], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_extension_built_for_another_torch_raises_one_paragraph_before_it_is_loaded(tmp_path):
    _package_copy(tmp_path, {"torch": "2.4.1+cu121", "torch_cuda": "12.1"})
    out = _import_copy(tmp_path)
    error = out.split("ImportError: ", 1)[1].split("\nloaded:")[0]
    assert "\n" not in error
    assert "torch 2.4.1+cu121 (CUDA 12.1)" in error and f"torch {torch.__version__}" in error
    assert "pip install ." in error
    assert out.strip().endswith("loaded: False"), out


def test_an_extension_built_for_this_torch_loads(tmp_path):
    _package_copy(tmp_path, {"torch": torch.__version__, "torch_cuda": torch.version.cuda})
    out = _import_copy(tmp_path)
    assert "ImportError" not in out and out.strip().endswith("loaded: True"), out


def test_an_extension_that_fails_to_load_raises_one_paragraph(tmp_path):
    target = _package_copy(tmp_path, None)
    extension = next(target.glob("_C*.so"))
    extension.write_bytes(b"not a shared library")
    out = _import_copy(tmp_path)
    error = out.split("ImportError: ", 1)[1].split("\nloaded:")[0]
    assert "\n" not in error and "does not load with" in error and "pip install ." in error, out


@pytest.mark.parametrize("checkout", [True, False], ids=["source-checkout", "installed-copy"])
def test_a_package_without_its_extension_says_why_in_one_paragraph(tmp_path, checkout):
    """Python run from a checkout imports the checkout's unbuilt pddm_ext/, which hides an installed
    one: the message says to run elsewhere or build in place, not to reinstall (which changes nothing)."""
    target = _package_copy(tmp_path, None)
    next(target.glob("_C*.so")).unlink()
    if checkout:
        (tmp_path / "setup.py").write_text("")
        (tmp_path / "csrc").mkdir()
    # An editable install of this checkout (make test's venv) maps pddm_ext._C to its own build through
    # a meta-path finder: leave it out, as an environment without that install has none.
    script = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
              "getattr(f, '__module__', '')]\n" + IMPORT_AND_REPORT)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    error = out.split("ImportError: ", 1)[1].split("\nloaded:")[0]
    assert "\n" not in error and "(pddm_ext/_C)" in error, out
    if checkout:
        assert "source checkout" in error and "another directory" in error and "pip install -e ." in error
    else:
        assert "is not built for this Python" in error and "pip install ." in error
