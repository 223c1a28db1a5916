"""Run by `make oldest-torch` with the .venv's python (torch 2.13) in a directory holding the pddm_ext
package installed in .venv-oldest (its extension built for torch 2.4.1; PYTHONPATH=. puts it first): `import pddm_ext` must raise the
one-paragraph ImportError that names both torches and the rebuild command, without loading the
extension (a mismatched library can crash instead of raising)."""

import os
import sys

import torch

try:
    import pddm_ext  # noqa: F401
except ImportError as error:
    message = str(error)
else:
    raise SystemExit(f"check_moved_build: {pddm_ext.__file__} imported under torch {torch.__version__}")
assert "pddm_ext._C" not in sys.modules, "the extension was loaded before the check"
assert "\n" not in message, message
assert os.path.join(os.getcwd(), "pddm_ext") in message, f"not the moved build: {message}"
assert "torch 2.4.1" in message and f"torch {torch.__version__}" in message and "pip install ." in message, message
print(f"check_moved_build: ImportError as expected: {message}")
