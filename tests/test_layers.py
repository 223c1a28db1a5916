"""The layers are visible in the imports.

The core library (``pddm_ext``'s top level) imports neither the trainer integrations
(``pddm_ext.integrations``) nor the training application (``pddm_ext.app``), nor their dependencies;
the reference (``pddm_ext.reference``, the oracle) imports nothing from the code it checks.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pddm_ext"
CORE_FILES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__main__.py")
HEAVY = ("tqdm", "matplotlib", "sklearn", "PIL", "mlxtend", "fontTools", "pytorch_metric_learning")

_LOADED = """
import json, sys
before = set(sys.modules)
import {module}
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _loaded_by(module, pre=""):
    """Top-level module names loaded by `import module` in a fresh interpreter (after `pre`)."""
    code = pre + _LOADED.format(module=module)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_pddm_ext_loads_only_the_core():
    torch_loads = set(_loaded_by("torch"))
    loaded = _loaded_by("pddm_ext", pre="import torch\n")
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY and m not in torch_loads]
    assert not heavy, f"import pddm_ext loads {heavy} beyond what import torch loads"
    outer = [m for m in loaded if m.startswith(("pddm_ext.app", "pddm_ext.integrations"))]
    assert not outer, f"import pddm_ext loads the outer layers: {outer}"
    assert {"pddm_ext.ops", "pddm_ext.functional", "pddm_ext.modules", "pddm_ext.reference"} <= set(loaded)


def _imports(path):
    """(module, level) of every import statement in a file; `from . import x` gives ('x', 1)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                found.append((node.module, node.level))
            else:
                found += [(alias.name, node.level) for alias in node.names]
    return found


def test_core_files_never_import_the_outer_layers():
    for path in CORE_FILES:
        for module, level in _imports(path):
            name = module if level == 0 else "pddm_ext." + module
            assert not name.startswith(("pddm_ext.integrations", "pddm_ext.app")), f"{path.name} imports {module}"
            assert module.split(".")[0] not in HEAVY, f"{path.name} imports {module}"


def test_the_reference_imports_nothing_from_the_package():
    for module, level in _imports(PACKAGE / "reference.py"):
        assert level == 0 and not module.startswith("pddm_ext"), f"reference.py imports {module}"
        assert module.split(".")[0] in ("__future__", "collections", "torch"), module


def test_public_names_of_the_outer_layers_still_resolve():
    import pddm_ext

    assert pddm_ext.MemoryBank.__module__ == "pddm_ext.integrations.memory"
    assert pddm_ext.PDDMMiner.__name__ == "PDDMMiner"
    assert pddm_ext.distributed is pddm_ext.integrations.distributed
    assert pddm_ext.distributed.global_batch is pddm_ext.collectives.global_batch
    assert not hasattr(pddm_ext, "data")  # the datasets are pddm_ext.app.datasets, the sampler pddm_ext.PKSampler
