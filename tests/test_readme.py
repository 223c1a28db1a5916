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


# --- install commands --------------------------------------------------------------------------


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
    """A checkout installs itself as `.` (or `'.[extra]'`) with plain pip (the build finds the torch already
    installed; no --no-build-isolation, no build tools installed by hand), and only with extras
    pyproject.toml defines; `pddm-ext[...]` (a name no index has yet) appears only where the line says it
    is the published package's name."""
    commands = install_commands()
    assert len(commands) >= 5, commands  # README's install section, the extras, the package's hints
    extras = _extras()
    assert {"train", "pml", "tensorboard"} <= extras
    for where, line in commands:
        for command in re.findall(r"pip install[^`;)\n]*", line):
            local = re.findall(r"(?:^|\s)['\"]?\.(?:\[([a-z,-]+)\])?['\"]?(?=\s|$)", command)
            if local:
                assert "isolation" not in command, (where, command)
                for group in local:
                    assert set(filter(None, group.split(","))) <= extras, (where, command)
        if "pddm-ext[" in line:
            assert "published" in line, (where, line)
        assert "setuptools wheel ninja" not in line, (where, line)


def _install_section():
    text = README.read_text()
    return text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]


def test_the_install_section_opens_with_the_command_a_user_types():
    section = _install_section()
    first_block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["pip install torch", "pip install ."], commands


def _install_commands_section():
    text = (ROOT / "docs" / "install.md").read_text()
    return text.split("## The commands", 1)[1].split("\n## ", 1)[0]


def test_every_flag_of_the_install_section_is_explained():
    """Every pip flag README's install section or install.md's command list uses is explained there, in
    the form "(`-e`: editable ...)"."""
    for index, section in enumerate((_install_section(), _install_commands_section())):
        flags = set()
        for command in re.findall(r"pip (?:install|wheel)[^`\n]*", section):
            flags |= set(re.findall(r"(?:^|\s)(-{1,2}[a-z][a-z-]*)", command))
        if index == 1:
            assert {"-e", "--no-deps", "-w", "-v"} <= flags, flags
        for flag in flags:
            assert re.search(rf"[(;] ?`{re.escape(flag)}( [^`]*)?`: ", section), flag  # "(`-e`: editable ..."


def test_the_cli_hint_for_a_missing_extra_is_the_checkout_command(monkeypatch, capsys):
    from pddm_ext.app.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the train extra were not installed
    assert main(["train", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the train extra (matplotlib missing)" in err
    assert "pip install '.[train]'" in err
