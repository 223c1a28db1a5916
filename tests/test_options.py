"""Every option of ``pddm-ext train`` and ``pddm-ext compare`` refuses its invalid values with one line
naming the option (exit status 2) before anything is loaded; the cases are generated from the parsers'
actions, so an option added without a value rule fails here."""

import argparse
import dataclasses

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from pddm_ext.app import options  # noqa: E402
from pddm_ext.app.cli import build_parser, main  # noqa: E402
from pddm_ext.app.config import ConfigError, TrainConfig, check_config  # noqa: E402

# What each numeric option means, stated here independently of the rules under test: the options for
# which 0 is a valid value, and those for which negative values are.
ZERO_VALID = {"--batches-per-epoch", "--warmup-steps", "--holdout", "--bce-weight", "--lam", "--seed", "--seeds",
              "--alpha", "--beta"}
NEGATIVE_VALID = {"--alpha", "--beta"}  # margins: any finite value
TOO_LARGE = {"--holdout": "1", "--seed": str(2**32), "--seeds": str(2**32), "--image-size": "100000",
             "--embedding-dim": "100000000", "--threads": "100000"}  # these two crashed inside torch


def _string_option_bad_values(tmp_path):
    """Invalid values of the options that take a string with a rule of its own."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    return {
        "--dataset": [["cifar10"], ["folder:"], [f"folder:{tmp_path / 'missing'}"], [""]],
        "--loss": [["contrastive"], [""]],
        "--losses": [["no-such-loss"], ["pddm", "pddm"], ["batch-hard", "pddm", "batch-hard"]],
        "--device": [["meta"], ["gpu"], ["cuda:-1"], [""], ["CPU"]],
        "--font-dir": [[str(tmp_path / "missing")], [str(afile)], [""]],
        "--out": [[str(afile)], [""]],
        "--tensorboard": [[str(afile)], [""]],
    }


def _value_actions(sub):
    return [a for a in sub._actions if a.option_strings and a.nargs != 0]


def _name(action):
    return max(action.option_strings, key=len)


def _numeric_bad_values(action):
    """Invalid values of a numeric option (each a list of command-line words)."""
    name, rule = _name(action), action.type
    words = ["abc", "", "1e400" if rule.kind is int else "nan", "inf", "-inf"]
    words += ["1.5", "nan"] if rule.kind is int else []
    if name not in ZERO_VALID:
        words += ["0", "-0.0" if rule.kind is float else "0"]
    if name not in NEGATIVE_VALID:
        words += ["-1", "-3"]
    if name in TOO_LARGE:
        words.append(TOO_LARGE[name])
    bad = [[w] for w in dict.fromkeys(words)]
    if name == "--seeds":
        bad += [["0", "0"], ["3", "1", "3"]]  # a seed given twice would be one run counted twice
    return bad


def _cases(tmp_path):
    strings = _string_option_bad_values(tmp_path)
    _, p_train, p_cmp = build_parser()
    for command, sub in (("train", p_train), ("compare", p_cmp)):
        for action in _value_actions(sub):
            name = _name(action)
            if isinstance(action.type, options.Number):
                bad = _numeric_bad_values(action)
            elif action.choices is not None:
                bad = [["no-such-choice"], [""]]
            elif name in strings:
                bad = strings[name]
            else:
                raise AssertionError(f"{command} {name} takes a value but has no value rule this test knows "
                                     f"(type {action.type!r}): give it an options.Number, choices, or a rule "
                                     f"and its invalid values here")
            for words in bad:
                yield command, action, words


def test_every_option_refuses_invalid_values_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    safe = ["--dataset", "digits", "--epochs", "1", "--batches-per-epoch", "1", "--threads", "1", "--quiet",
            "--out", str(out)]
    cases = list(_cases(tmp_path))
    assert len({(c, _name(a)) for c, a, _ in cases}) >= 2 * 24  # every option of both commands took part
    for command, action, words in cases:
        # the bad value last (argparse keeps the last), in the --opt=value form for a single value so
        # that values starting with "-" reach the option's rule
        argv = [command, *safe, *([f"{_name(action)}={words[0]}"] if len(words) == 1 else [_name(action), *words])]
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("pddm-ext: error: argument "), (argv, err)
        assert "/".join(action.option_strings) in err or action.option_strings[0] in err, (argv, err)
        assert "Traceback" not in err
    assert not out.exists()  # nothing trained or written


def test_valid_boundary_values_pass_the_option_rules():
    _, p_train, p_cmp = build_parser()
    for sub in (p_train, p_cmp):
        for action in _value_actions(sub):
            if not isinstance(action.type, options.Number):
                continue
            name = _name(action)
            if name in ZERO_VALID:
                assert action.type("0") == 0, name
            if name in NEGATIVE_VALID:
                assert action.type("-2.5") == -2.5, name
            if name not in ("--holdout", "--image-size"):  # those two: their boundaries below
                assert action.type("2") == 2, name
    args = p_train.parse_args(["--image-size", "8", "-P", "2", "-K", "2", "--holdout", "0.5", "--seed", str(2**32 - 1)])
    assert (args.image_size, args.p, args.k, args.holdout, args.seed) == (8, 2, 2, 0.5, 2**32 - 1)


def test_the_api_applies_the_same_rules(tmp_path):
    """check_config (TrainConfig built in Python) refuses what the options refuse, with the same message."""
    base = TrainConfig(dataset="digits", out=str(tmp_path / "run"))
    check_config(base)
    for name, rule in options.NUMBERS.items():
        for value in (0, -1, float("nan"), float("inf"), "3", True):
            message = rule.problem(value)
            if message is None:
                continue
            with pytest.raises(ConfigError) as info:
                check_config(dataclasses.replace(base, **{name: value}))
            assert str(info.value) == message and rule.label in message, (name, value, info.value)
    # an image size of 0 is refused (it meant "the default" before), and so is a negative one
    for size in (0, -32, 4097):
        with pytest.raises(ConfigError, match="image_size must be in"):
            check_config(dataclasses.replace(base, image_size=size))
    for device in ("meta", "mps", "cuda:x"):
        with pytest.raises(ConfigError, match="device"):
            check_config(dataclasses.replace(base, device=device))


def test_compare_refuses_a_repeated_seed_or_loss_before_any_run(tmp_path, capsys):
    from pddm_ext.app.compare import run_all

    out = tmp_path / "cmp"
    for extra in (["--seeds", "0", "0"], ["--losses", "pddm", "batch-hard", "pddm"]):
        assert main(["compare", "--dataset", "digits", "--epochs", "1", "--quiet", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is given twice" in err and extra[0] in err
    base = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=1, threads=1)
    with pytest.raises(ConfigError, match=r"seeds: 0 given more than once"):
        run_all(base, ["pddm"], [0, 0], str(out), progress=False)
    with pytest.raises(ConfigError, match=r"losses: pddm given more than once"):
        run_all(base, ["pddm", "pddm"], [0], str(out), progress=False)
    with pytest.raises(ConfigError, match="seeds must name at least one value"):
        run_all(base, ["pddm"], [], str(out), progress=False)
    assert not out.exists()


def test_parse_errors_are_one_line_and_help_still_works(capsys):
    for argv in ([], ["train", "--no-such-option"], ["fit"], ["compare", "--seeds"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("pddm-ext: error: "), (argv, err)
    with pytest.raises(SystemExit) as info:
        main(["compare", "--help"])
    assert info.value.code == 0 and "--seeds" in capsys.readouterr().out
    assert isinstance(build_parser()[0], argparse.ArgumentParser)
