"""The value rules of the training options, in one place for the command line and the Python API.

Each rule is an argparse ``type=`` for ``pddm-ext train`` / ``pddm-ext compare`` (a bad value stops
the parser with ``pddm-ext: error: argument --OPTION: ...``, exit status 2, before anything is
loaded) and the check ``train.check_config`` applies to a ``TrainConfig`` built in Python (the same
message, as a ``ConfigError``).

``NUMBERS`` (field -> rule) joins these rules and those of ``PDDMLoss``'s options, which are declared
with the options (``pddm_ext.modules.LOSS_OPTIONS``, read through ``pddm_ext.app.loss_options``).

- :class:`Number`: an int or a float that must pass a list of (test, requirement) checks; the first
  failing one gives ``"<label> must be <requirement>, got <value>"``. Floats are parsed by ``float``
  (so ``nan`` and ``inf`` parse, and the checks refuse them where they are invalid).
- :class:`Name`: one of a fixed set of names (the losses, the compare entries).
- :func:`dataset_name`, :func:`device_name`, :func:`existing_folder`, :func:`output_folder`: the
  string options with a rule of their own.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os

from .datasets import DATASETS


def at_least(low):
    return (lambda v: v >= low), f">= {low}"


def positive_finite():
    return (lambda v: v > 0 and math.isfinite(v)), "> 0 and finite"


FINITE = (math.isfinite, "finite")


class Number:
    """An int (``kind=int``) or float option value that passes ``checks`` in order.

    ``checks``: tuples ``(test, requirement)`` or ``(test, requirement, label)``; ``label`` names the
    value in the message (default: the rule's ``label``, else ``name``). ``problem(value)`` is the
    message for a bad value (a wrong type included), or None; calling the rule on a string (argparse)
    parses it and raises ``argparse.ArgumentTypeError`` with that message.
    """

    def __init__(self, name, kind, *checks, label=None):
        self.name, self.kind, self.checks, self.label = name, kind, checks, label or name
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def problem(self, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return f"{self.label} must be {'an int' if self.kind is int else 'a real number'}, got {value!r}"
        for check in self.checks:
            test, requirement = check[:2]
            if not test(value):
                label = check[2] if len(check) > 2 else self.label
                return f"{label} must be {requirement}, got {value}"
        return None

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if self.kind is int else 'a number'}, got {text!r}") from None
        message = self.problem(value)
        if message:
            raise argparse.ArgumentTypeError(message)
        return value

    def __repr__(self):
        return f"Number({self.name!r}, {self.kind.__name__})"


def _cores():
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (a container's share)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


CORES = _cores()
EMBEDDING_DIM_MAX = 4096  # the PDDM unit's weights grow with its square
SEED = Number("seed", int, ((lambda v: 0 <= v < 2**32), "in [0, 2**32 - 1]"))  # numpy / scikit-learn seeds
IMAGE_SIZE_RANGE = (8, 4096)

# TrainConfig field -> its rule, for the fields that are not PDDMLoss's options (``NUMBERS`` adds those).
# A field whose value may be None (use the default) is checked only when set.
_APP_NUMBERS = {rule.name: rule for rule in (
    Number("epochs", int, at_least(1)),
    Number("p", int, (lambda v: v >= 2, ">= 2 so every batch has negatives"), label="P (classes per batch)"),
    Number("k", int, (lambda v: v >= 2, ">= 2 so every class has a positive pair"),
           label="K (images per class in a batch)"),
    Number("batches_per_epoch", int, at_least(1)),
    Number("lr", float, positive_finite()),
    Number("unit_lr", float, positive_finite()),
    Number("embedding_dim", int, ((lambda v: 1 <= v <= EMBEDDING_DIM_MAX), f"in [1, {EMBEDDING_DIM_MAX}]")),
    Number("holdout", float, ((lambda v: 0 <= v < 1), "in [0, 1)")),
    Number("threads", int, ((lambda v: 1 <= v <= CORES), f"in [1, {CORES}] (the CPU cores this process may use)")),
    Number("image_size", int, ((lambda v: IMAGE_SIZE_RANGE[0] <= v <= IMAGE_SIZE_RANGE[1]),
                               f"in [{IMAGE_SIZE_RANGE[0]}, {IMAGE_SIZE_RANGE[1]}] (pixels)")),
    SEED,
)}
_APP_OPTIONAL = ("p", "batches_per_epoch", "unit_lr", "threads", "image_size")


def __getattr__(name):
    """``NUMBERS`` (TrainConfig field -> rule) and ``OPTIONAL`` (the fields checked only when set),
    PDDMLoss's options included: those are read from their declaration (``loss_options``) on each access."""
    from . import loss_options

    if name == "NUMBERS":
        return {**_APP_NUMBERS, **loss_options.numbers()}
    if name == "OPTIONAL":
        return _APP_OPTIONAL + loss_options.optional()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# the command line's --batches-per-epoch also takes 0: one pass over the training images (None in TrainConfig)
BATCHES_PER_EPOCH_ARG = Number("batches_per_epoch", int, at_least(0))


class Name:
    """One of ``names``; anything else is ``"unknown <what> 'x'; expected one of ..."``."""

    def __init__(self, what, names):
        self.what, self.names = what, tuple(names)
        self.__name__ = what

    def problem(self, value):
        if value not in self.names:
            return f"unknown {self.what} {value!r}; expected one of {', '.join(self.names)}"
        return None

    def __call__(self, text):
        message = self.problem(text)
        if message:
            raise argparse.ArgumentTypeError(message)
        return text


def dataset_problem(name):
    """The message for a dataset name that cannot be loaded before looking at its files, or None."""
    if not isinstance(name, str) or not (name in DATASETS[:4] or name.startswith(("folder:", "icons:"))):
        return f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}"
    if name.startswith(("folder:", "icons:")):
        path = name.split(":", 1)[1]
        if not path or not os.path.isdir(os.path.expanduser(path)):
            return f"dataset {name}: folder {path!r} does not exist"
    return None




def device_problem(name):
    """The message for a device that is not cpu or cuda[:N] (its availability is checked later), or None."""
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        return f"unknown device {name!r}; expected cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"device {name!r} is not supported; expected cpu, cuda or cuda:N"
    return None


def _argparse_type(problem, name):
    """The argparse ``type=`` that refuses a string for which ``problem`` returns a message."""

    def parse(text):
        message = problem(text)
        if message:
            raise argparse.ArgumentTypeError(message)
        return text

    parse.__name__ = name
    return parse


dataset_name = _argparse_type(dataset_problem, "dataset_name")  # a known dataset, or folder:PATH that exists
device_name = _argparse_type(device_problem, "device_name")  # cpu, cuda or cuda:N


def existing_folder(text):
    """argparse type of a folder that must exist (``--font-dir``)."""
    if not text or not os.path.isdir(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(f"folder {text!r} does not exist")
    return text


def output_folder(text):
    """argparse type of an output folder (``--out``, ``--tensorboard``): created if missing, so it
    must be non-empty and must not name an existing file."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got ''")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return text


class Unique(argparse.Action):
    """``nargs="+"`` action that refuses a value given twice (each value is one run of ``compare``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = set()
        for value in values:
            if value in seen:
                raise argparse.ArgumentError(self, f"{value} is given twice (each value is one run; "
                                                   f"give it once)")
            seen.add(value)
        setattr(namespace, self.dest, list(values))
