"""PDDMLoss's options are declared once (``pddm_ext.modules.LOSS_OPTIONS``): the constructor, the
``pddm-ext`` flags, the training config's defaults and checks, ``compare``'s variants and the values of
old runs all read them there; ``mining=`` mines through the metric registry (``ops.METRICS``)."""

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

import pddm_ext
from pddm_ext import modules, ops
from pddm_ext.modules import LOSS_OPTIONS, LossOption, PDDMLoss


def _app():
    for extra in ("sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(extra)


def test_every_declared_option_is_a_keyword_of_pddmloss_with_its_default():
    parameters = inspect.signature(PDDMLoss).parameters
    for name, option in LOSS_OPTIONS.items():
        assert option.name == name and parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[name].default == option.default, name
        assert f"``{name}``" in PDDMLoss.__doc__  # the docstring lists it, from the table
    loss_fn = PDDMLoss(4)
    for name, option in LOSS_OPTIONS.items():
        if option.check is not None:  # the unit's options live on the unit
            assert getattr(loss_fn, name) == option.default, name


def test_the_train_defaults_differ_from_pddmloss_only_where_declared():
    """pddm-ext train departs from PDDMLoss's defaults only in loss_options.TRAIN_DEFAULTS (with a reason each)."""
    _app()
    from pddm_ext.app.loss_options import TRAIN_DEFAULTS, app_options
    from pddm_ext.app.config import TrainConfig

    config = TrainConfig()
    differ = {o.field for o in app_options() if getattr(config, o.field) != o.default}
    assert differ == set(TRAIN_DEFAULTS)
    assert all(isinstance(why, str) and why for _, why in TRAIN_DEFAULTS.values())


def test_a_throwaway_option_declared_in_one_place_reaches_the_app(monkeypatch, tmp_path, capsys):
    """Two options declared only in the table (a number with a rule, a name with choices) reach the flags
    of ``pddm-ext train`` and ``compare``, the config checks, build_loss's arguments, compare's variants
    and the legacy defaults; the TrainConfig field is the one line a new option adds elsewhere."""
    _app()
    from pddm_ext.app import compare, loss_options
    from pddm_ext.app import config as config_mod
    from pddm_ext.app.cli import build_parser, main
    from pddm_ext.app.config import ConfigError, TrainConfig, check_config

    monkeypatch.setitem(LOSS_OPTIONS, "margin_scale", LossOption(
        "margin_scale", float, 1.5, "a throwaway scale", pddm_ext._validate.check_number,
        rule=(((lambda v: v > 0), "> 0"),), field="margin_scale", legacy=2.0, variants={"pddm-scaled": 3.0}))
    monkeypatch.setitem(LOSS_OPTIONS, "pair_policy", LossOption(
        "pair_policy", str, "a", "a throwaway policy", None, choices=("a", "b"), field="pair_policy",
        legacy="a", variants={"pddm-scaled": "b", "pddm-policy-b": "b"}))

    # the command line: both commands, with the declared default, rule and choices
    _, p_train, p_cmp = build_parser()
    for sub in (p_train, p_cmp):
        args = sub.parse_args([])
        assert (args.margin_scale, args.pair_policy) == (1.5, "a")
        args = sub.parse_args(["--margin-scale", "0.25", "--pair-policy", "b"])
        assert (args.margin_scale, args.pair_policy) == (0.25, "b")
    assert "a throwaway scale" in p_train.format_help() and "--pair-policy {a,b}" in p_cmp.format_usage()
    assert p_cmp.parse_args(["--losses", "pddm", "pddm-scaled", "pddm-policy-b"]).losses == \
        ["pddm", "pddm-scaled", "pddm-policy-b"]
    out = tmp_path / "run"
    for argv, message in ((["--margin-scale=0"], "margin_scale must be > 0, got 0"),
                          (["--pair-policy", "c"], "invalid choice: 'c'")):
        for command in ("train", "compare"):
            assert main([command, "--dataset", "digits", "--quiet", "--out", str(out), *argv]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and message in err, err
    assert not out.exists()

    # the config checks, on a TrainConfig with the option's one line
    @dataclasses.dataclass
    class Config(TrainConfig):
        margin_scale: float = loss_options.train_default("margin_scale")
        pair_policy: str = loss_options.train_default("pair_policy")

    config = Config(dataset="digits", out=str(out))
    check_config(config)
    for bad, message in ((dict(margin_scale=-1.0), "margin_scale must be > 0, got -1.0"),
                         (dict(margin_scale="2"), "margin_scale must be a real number, got '2'"),
                         (dict(pair_policy="c"), "pair_policy must be a or b, got 'c'")):
        with pytest.raises(ConfigError) as info:
            check_config(dataclasses.replace(config, **bad))
        assert str(info.value) == message
    assert loss_options.loss_kwargs(config)["margin_scale"] == 1.5  # what build_loss passes to PDDMLoss

    # compare's variants, entries and the fields a baseline does not read
    assert compare.VARIANTS["pddm-scaled"] == ("pddm", {"margin_scale": 3.0, "pair_policy": "b"})
    assert compare.VARIANTS["pddm-policy-b"] == ("pddm", {"pair_policy": "b"})
    assert {"pddm-scaled", "pddm-policy-b"} <= set(compare.ENTRIES)
    assert {"margin_scale", "pair_policy"} <= set(compare.PDDM_ONLY_FIELDS)
    scaled = compare.entry_config(config, "pddm-scaled")
    assert (scaled.loss, scaled.margin_scale, scaled.pair_policy) == ("pddm", 3.0, "b")
    assert compare._unread_fields(dataclasses.replace(config, loss="batch-hard")) >= {"margin_scale", "pair_policy"}

    # runs saved before the option existed: their legacy value
    assert (config_mod.LEGACY_DEFAULTS["margin_scale"], config_mod.LEGACY_DEFAULTS["pair_policy"]) == (2.0, "a")
    monkeypatch.setattr(config_mod, "TrainConfig", Config)
    assert config_mod.saved_config({"dataset": "digits"}).margin_scale == 2.0


def _steps(loss_fn, reference_mode, steps=3):
    """Loss, gradients and quadruplets of a few training calls on fixed random batches."""
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(12, 6, generator=g, requires_grad=True)
        labels = torch.randint(0, 3, (12,), generator=g)
        refs = dict(ref_emb=torch.randn(9, 6, generator=g), ref_labels=torch.randint(0, 3, (9,), generator=g))
        loss = loss_fn(x, labels, **(refs if reference_mode else {}))
        loss.backward()
        out.append([loss.detach(), x.grad, *[p.grad.clone() for p in loss_fn.parameters()],
                    *loss_fn.last_quadruplets[:5]])
        loss_fn.zero_grad()
    return out


@pytest.mark.parametrize("negatives", ["hardest", "semihard"])
@pytest.mark.parametrize("reference_mode", [False, True])
def test_mining_euclidean_is_bitwise_a_warmup_that_never_ends(negatives, reference_mode):
    """mining="euclidean" mines every batch as the Euclidean warm-up does (the training app's control
    was such a warm-up): the same losses, gradients and quadruplets, bit for bit; the unit's mining differs."""
    runs = {}
    for name, option in (("mining", dict(mining="euclidean")), ("warmup", dict(warmup_steps=10**9)),
                         ("unit", dict(mining="pddm"))):
        torch.manual_seed(0)
        runs[name] = _steps(PDDMLoss(6, k=None, negatives=negatives, **option), reference_mode)
    for got, want in zip(runs["mining"], runs["warmup"]):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert any(not torch.equal(a, b) for got, want in zip(runs["mining"], runs["unit"]) for a, b in zip(got[-5:], want[-5:]))


def test_mining_is_a_real_option():
    """mining="euclidean" mines by distance in evaluation mode too (a warm-up counts training calls only),
    and counts no warm-up; a metric that is not in ops.METRICS is refused, naming the option."""
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
    loss_fn = PDDMLoss(5, k=3, mining="euclidean").eval()
    loss_fn(x, labels)
    want = pddm_ext.mine_hard(F.normalize(x, dim=1), labels, k=3)  # no unit: Euclidean distance
    assert all(torch.equal(a, b) for a, b in zip(loss_fn.last_quadruplets[:5], want[:5]))
    assert loss_fn.warmup_done == 0 and "mining='euclidean'" in repr(loss_fn)
    assert LOSS_OPTIONS["mining"].choices == tuple(ops.METRICS)
    with pytest.raises(ValueError, match=r"mining must be one of 'pddm', 'euclidean', got 'cosine'"):
        PDDMLoss(5, mining="cosine")
    for bad in (None, 1):  # not a str: a TypeError, naming the option and the type given
        with pytest.raises(TypeError, match=rf"^mining must be a str, one of 'pddm', 'euclidean', got {type(bad).__name__}"):
            PDDMLoss(5, mining=bad)


@pytest.mark.parametrize("metric", list(ops.METRICS))
def test_each_metric_scores_all_pairs_as_its_reference(metric):
    """ops.METRICS[...].scores (the semi-hard negatives' score matrix) against the reference's formula."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    unit = pddm_ext.PDDM(5, dtype=torch.float64)
    params = tuple(p.detach() for p in unit.params())
    row = ops.METRICS[metric]
    for form in (True, False):
        torch.testing.assert_close(row.scores(x, y, params, form), row.reference_scores(x, y, params, form))


def test_negative_policies_are_the_negatives_choices():
    assert LOSS_OPTIONS["negatives"].choices == tuple(modules.NEGATIVES) == ("hardest", "semihard")
    with pytest.raises(ValueError, match=r"negatives must be one of 'hardest', 'semihard', got 'easy'"):
        PDDMLoss(4, negatives="easy")
    with pytest.raises(TypeError, match=r"^negatives must be a str, one of 'hardest', 'semihard', got NoneType"):
        PDDMLoss(4, negatives=None)


@pytest.mark.parametrize("bad, error", [(1.5, ValueError), (float("nan"), ValueError), ("0.1", TypeError)])
def test_unit_dropout_errors_name_the_loss_option(bad, error):
    """PDDMLoss(unit_dropout=) is checked as the loss's own option, so its error names unit_dropout
    (the argument the user gave), not the unit's dropout."""
    with pytest.raises(error, match=r"^unit_dropout must be"):
        PDDMLoss(5, unit_dropout=bad)
