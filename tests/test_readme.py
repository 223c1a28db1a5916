"""README.md's Python examples run as written (the README is part of the contract with users)."""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


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


# --- install commands (issue 16 item 4) ----------------------------------------------------------


def install_commands():
    """(file, line) of every `pip install ...` the README, the examples and the package show or print."""
    files = [README, *sorted((ROOT / "examples").glob("*.py")), *sorted((ROOT / "pddm_ext").rglob("*.py"))]
    found = []
    for path in files:
        for line in path.read_text().splitlines():
            if "pip install" in line:
                found.append((path.relative_to(ROOT), line))
    return found


def _extras():
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", block, re.M))


def test_install_commands_work_from_a_checkout():
    """A checkout installs itself as `.` (or `'.[extra]'`) built against the torch already installed,
    so with --no-build-isolation, and only with extras pyproject.toml defines; `pddm-ext[...]` (a name
    no index has yet) appears only where the line says it is the published package's name."""
    commands = install_commands()
    assert len(commands) >= 5, commands  # README's install section, the extras, the package's hints
    extras = _extras()
    assert {"train", "pml", "tensorboard"} <= extras
    for where, line in commands:
        for command in re.findall(r"pip install[^`;)\n]*", line):
            local = re.findall(r"(?:^|\s)['\"]?\.(?:\[([a-z,-]+)\])?['\"]?(?=\s|$)", command)
            if local:
                assert "--no-build-isolation" in command, (where, command)
                for group in local:
                    assert set(filter(None, group.split(","))) <= extras, (where, command)
        if "pddm-ext[" in line:
            assert "published" in line, (where, line)


def test_the_cli_hint_for_a_missing_extra_is_the_checkout_command(monkeypatch, capsys):
    from pddm_ext.app.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the train extra were not installed
    assert main(["train", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the train extra (matplotlib missing)" in err
    assert "pip install --no-build-isolation '.[train]'" in err
