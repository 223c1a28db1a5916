"""Loads the compiled extension ``pddm_ext._C``, after checking that it was built for the torch imported.

A C++ extension of torch runs only with the torch it was compiled against: loaded under another
version (or the CPU build of a CUDA one) it fails with an undefined-symbol dump, or crashes. The build
writes ``_build_info.json`` next to the extension (setup.py: the torch version and CUDA version it
compiled against, the extension's file name and size); ``load`` compares it with the running torch
*before* it loads the library and raises one ImportError paragraph naming both torches and the command
that rebuilds. An extension without a record that describes it (copied alone, or built before the
record existed) is loaded as it is, and a failure to load it gets the same kind of paragraph.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os

import torch

BUILD_INFO = "_build_info.json"
REBUILD = ("rebuild it against this torch: from the pddm-ext checkout, `pip install .` "
           "(`pip install -e .` for a development install, `make install` in the Makefile's .venv)")


def _describe(version, cuda):
    return f"torch {version} ({'CUDA ' + cuda if cuda else 'CPU'})"


def mismatch_message(info: dict, torch_version: str, torch_cuda, extension: str):
    """The ImportError paragraph when `info` (the build record) names another torch than the running
    one (`torch_version`, `torch_cuda`: torch.__version__, torch.version.cuda), else None."""
    if info.get("torch") == torch_version and info.get("torch_cuda") == torch_cuda:
        return None
    return (f"pddm_ext's compiled extension {extension} was built for {_describe(info.get('torch'), info.get('torch_cuda'))}, "
            f"but this Python imports {_describe(torch_version, torch_cuda)}; a C++ extension runs only with the torch "
            f"it was compiled against, so it was not loaded: {REBUILD}.")


def missing_message(package_dir: str, torch_version: str):
    """The ImportError paragraph when the package in `package_dir` has no compiled extension. Python
    run from a checkout imports the checkout's unbuilt ``pddm_ext/`` (the current directory comes first
    on sys.path) and so hides a package that ``pip install .`` installed: said so when `package_dir` is
    a source tree."""
    checkout = os.path.dirname(package_dir)
    if os.path.isfile(os.path.join(checkout, "setup.py")) and os.path.isdir(os.path.join(checkout, "csrc")):
        return (f"pddm_ext was imported from the source checkout {package_dir}, which has no compiled "
                f"extension (pddm_ext/_C); Python looks in the current directory first, so this copy hides "
                f"any pddm_ext installed with `pip install .`: run Python from another directory, or build "
                f"in place with `pip install -e .` (torch {torch_version}).")
    return (f"pddm_ext's compiled extension (pddm_ext/_C) is not built for this Python (torch "
            f"{torch_version}): {REBUILD}.")


def read_info(extension: str):
    """The build record next to `extension` when it describes that file (same name and size), else None."""
    path = os.path.join(os.path.dirname(extension), BUILD_INFO)
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if info.get("extension") != os.path.basename(extension) or info.get("size") != os.path.getsize(extension):
        return None
    return info


def load():
    """Imports and returns pddm_ext._C; ImportError (one paragraph) when it is missing or built for
    another torch."""
    spec = importlib.util.find_spec("pddm_ext._C")
    if spec is None or not spec.origin:
        raise ImportError(missing_message(os.path.dirname(os.path.abspath(__file__)), torch.__version__))
    info = read_info(spec.origin)
    if info is not None:
        message = mismatch_message(info, torch.__version__, torch.version.cuda, spec.origin)
        if message:
            raise ImportError(message)
    try:
        return importlib.import_module("pddm_ext._C")
    except (ImportError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImportError(f"pddm_ext's compiled extension {spec.origin} does not load with "
                          f"{_describe(torch.__version__, torch.version.cuda)} ({first}); it was probably built for "
                          f"another torch: {REBUILD}.") from error
