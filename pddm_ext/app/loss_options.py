"""The training app's side of ``PDDMLoss``'s options, read from where each is declared once
(``pddm_ext.modules.LOSS_OPTIONS``): the ``pddm-ext`` flags, the ``TrainConfig`` defaults, value
rules and checks, ``build_loss``'s arguments, ``compare``'s variants and the values of runs saved
before an option existed.

An option with a ``field`` is offered by ``pddm-ext train`` and ``compare`` as ``--<field with dashes>``
and needs one line more: its ``TrainConfig`` field (``<field>: <type> = train_default("<field>")``).

``TRAIN_DEFAULTS`` is the one place where ``pddm-ext train``'s defaults differ from ``PDDMLoss``'s, each
with its reason; every other option trains with ``PDDMLoss``'s default.
"""

from __future__ import annotations

import argparse

from .. import modules
from . import options

# TrainConfig field -> (value, why): pddm-ext train's default where it differs from PDDMLoss's on purpose
TRAIN_DEFAULTS = {
    # PDDMLoss: k = 1, the paper's single hardest pair. Mining every positive pair lets the unit learn
    # (docs/experiments.md); P K / 2 is build_loss's default for None.
    "mine_k": (None, "P K / 2 (PDDMLoss: 1, the paper's rule)"),
    # PDDMLoss keeps the paper's hardest negatives (with its k = 1, semi-hard gave a unit AUC of 0.67);
    # with pddm-ext train's P K / 2 pairs semi-hard lifts glyphs Recall@1 from 0.957 to 0.985 (5 seeds,
    # docs/experiments.md, benchmarks/results/compare/glyphs_issue13)
    "negatives": ("semihard", "semihard (PDDMLoss: hardest, the paper's rule)"),
}


# field -> what pddm-ext train adds to the option's behaviour (shown in --help)
NOTES = {"warmup_steps": "pddm-ext train ends it early once the unit's held-out AUC reaches Euclidean distance's"}


def app_options():
    """The ``LossOption``s that ``pddm-ext`` offers (those with a ``field``), in the table's order."""
    return [option for option in modules.LOSS_OPTIONS.values() if option.field is not None]


def _by_field(field):
    return next(option for option in app_options() if option.field == field)


def train_default(field):
    """``TrainConfig``'s default of a loss option's field: ``TRAIN_DEFAULTS``, else ``PDDMLoss``'s."""
    return TRAIN_DEFAULTS[field][0] if field in TRAIN_DEFAULTS else _by_field(field).default


# the loss options' fields that the baseline losses read too (build_loss: beta, their triplet margin)
BASELINE_FIELDS = ("beta",)


def fields():
    """The ``TrainConfig`` fields of the loss options."""
    return tuple(option.field for option in app_options())


def pddm_only_fields():
    """The ``TrainConfig`` fields that only the PDDM losses read (build_loss, build_optimizer)."""
    return ("unit_lr",) + tuple(field for field in fields() if field not in BASELINE_FIELDS)


def numbers():
    """field -> ``options.Number``, the value rule of each numeric loss option."""
    return {o.field: options.Number(o.field, o.kind, *o.rule) for o in app_options() if o.kind in (int, float)}


def optional():
    """The fields whose default is None (the app picks the value): checked only when set."""
    return tuple(field for field in fields() if train_default(field) is None)


def choice_problem(cfg):
    """The message for the first loss option of ``cfg`` outside its choices, or None."""
    for o in app_options():
        value = getattr(cfg, o.field)
        if o.choices and value not in o.choices:
            return f"{o.field} must be {' or '.join(o.choices)}, got {value!r}"
    return None


def legacy_defaults():
    """field -> the value of runs saved before the option existed."""
    return {o.field: o.legacy for o in app_options() if o.legacy is not None}


def variants():
    """``compare``'s PDDM variants: entry -> ("pddm", {field: value}), the settings in the table's order."""
    out = {}
    for o in app_options():
        for entry, value in o.variants.items():
            out.setdefault(entry, ("pddm", {}))[1][o.field] = value
    return out


def loss_kwargs(cfg):
    """``PDDMLoss``'s keyword arguments from ``cfg`` (a TrainConfig), one per offered option."""
    return {o.name: getattr(cfg, o.field) for o in app_options()}


def add_arguments(parser):
    """The ``--<field>`` flag of every offered loss option, with its rule, choices or ``--no-`` form."""
    rules = numbers()
    for o in app_options():
        default = train_default(o.field)
        shown = TRAIN_DEFAULTS[o.field][1] if o.field in TRAIN_DEFAULTS else default
        kind = (dict(action=argparse.BooleanOptionalAction) if o.kind is bool
                else dict(choices=list(o.choices)) if o.choices else dict(type=rules[o.field]))
        parser.add_argument("--" + o.field.replace("_", "-"), default=default, **kind,
                            help=f"PDDM losses: {o.help}{'; ' + NOTES[o.field] if o.field in NOTES else ''} "
                                 f"(default {shown})".replace("%", "%%"))
