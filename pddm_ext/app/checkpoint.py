"""Training checkpoints that are safe to load: written atomically, read with ``weights_only=True``.

A checkpoint (``<out>/checkpoint.pt``) is a dict of tensors and plain Python values only (dicts, lists,
tuples, str, int, float, bool, None): the model's, the loss's and the optimiser's state dicts, the epoch,
the config (``dataclasses.asdict``), the history, and every RNG state converted to tensors and plain
types (``rng_state``). ``load_checkpoint`` reads it with ``torch.load(..., weights_only=True)``, so a
crafted file cannot run code while it is read; a file that is not such a checkpoint (corrupt,
truncated, foreign, or holding Python objects) raises one :class:`CheckpointError` naming the file and
what to do.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile

import numpy as np
import torch

REQUIRED_KEYS = ("model", "loss", "optimizer", "epoch", "rng", "config", "history", "train_time", "floor")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from (one-line message naming the file and the remedy)."""


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(generator):
    """Every RNG state a run depends on, as tensors and plain types: torch's CPU generator, numpy's
    and Python's global generators, ``generator`` (the P x K sampler's torch.Generator) and, when
    CUDA is available, every CUDA generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = dict(torch=torch.get_rng_state(), sampler=generator.get_state(),
                 numpy=dict(kind=str(kind), keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), cached_gaussian=float(cached)),
                 python=dict(version=int(version), internal=[int(v) for v in internal], gauss_next=gauss_next))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator):
    """Restores what ``rng_state`` saved (``generator``: the sampler's torch.Generator)."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path):
    """The checkpoint dict at ``path``, read with ``torch.load(weights_only=True)`` on the CPU.

    Raises :class:`CheckpointError` (naming ``path``) when the file is missing, unreadable, truncated
    or corrupt, is not a torch file, holds Python objects other than tensors and plain values (the
    file is then not unpickled: nothing in it runs), or lacks a checkpoint's keys.
    """
    remedy = ("delete it (or point --out at a new folder) to start a new run, or restore the file from a "
              "backup; only checkpoints written by pddm-ext train are loaded")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"no checkpoint at {path}") from exc
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if unsafe:  # weights_only refused a class or function: a foreign file, or one that would run code
            raise CheckpointError(f"{path} is not a pddm-ext checkpoint: it holds Python objects ({unsafe.group(1)}), "
                                  f"which are not loaded for safety; {remedy}") from None
        operand = re.search(r"(Unsupported operand \S+|invalid load key[^\n]*)", str(exc))
        raise CheckpointError(f"{path} is not a readable pddm-ext checkpoint: corrupt, truncated or of another "
                              f"format ({operand.group(1) if operand else 'unpickling failed'}); {remedy}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError,
            TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} is not a readable pddm-ext checkpoint: corrupt, truncated or of another "
                              f"format ({type(exc).__name__}: {first}); {remedy}") from None
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in REQUIRED_KEYS):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a pddm-ext checkpoint (expected keys {', '.join(REQUIRED_KEYS)}; "
                              f"found {found}); {remedy}")
    if not isinstance(checkpoint["config"], dict) or not isinstance(checkpoint["epoch"], int):
        raise CheckpointError(f"{path} is not a pddm-ext checkpoint (config or epoch of the wrong type); {remedy}")
    return checkpoint


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
