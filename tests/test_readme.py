"""README.md's Python examples run as written (the README is part of the contract with users)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert python_blocks(), "README.md lost its Python examples"


def test_readme_python_examples_run():
    # Every ```python block runs, in order, in one namespace; fragments that cannot run alone are
    # written as ```text or ```diff blocks instead.
    namespace = {}
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
