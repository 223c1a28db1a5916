"""Every entry point that faces pytorch-metric-learning gives the package's own
TypeError naming ``labels`` for labels that are not a tensor (a list, a numpy array), in both forms
of ``PDDMMiner`` (on PML's BaseMiner, and the plain callable used without PML) and in ``PDDMLoss``.
The choice (tensors only, as in the rest of the package) is documented in
``pddm_ext.integrations.miners``."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import pddm_ext
from pddm_ext.integrations import miners


def _forms(monkeypatch):
    with_pml = miners.PDDMMiner
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning.miners", None)  # import fails: plain form
    plain = miners._miner_class()
    assert not issubclass(plain, torch.nn.Module)
    return {"pml": with_pml, "plain": plain}


BAD_LABELS = {"list": [0, 0, 1, 1, 2, 2, 3, 3], "numpy": np.array([0, 0, 1, 1, 2, 2, 3, 3]),
              "tuple": (0, 0, 1, 1, 2, 2, 3, 3)}


@pytest.mark.parametrize("labels", list(BAD_LABELS))
@pytest.mark.parametrize("form", ["pml", "plain"])
@pytest.mark.parametrize("mode", ["mine_hard", "batch_hard"])
def test_miner_rejects_non_tensor_labels_with_a_type_error(monkeypatch, form, labels, mode):
    miner = _forms(monkeypatch)[form](mode=mode)
    x = torch.randn(8, 4)
    with pytest.raises(TypeError, match=r"^labels must be a torch.Tensor, got "):
        miner(x, BAD_LABELS[labels])
    with pytest.raises(TypeError, match=r"^ref_labels must be a torch.Tensor, got "):
        miner(x, torch.arange(8) // 2, torch.randn(3, 4), BAD_LABELS[labels][:3])
    with pytest.raises(TypeError, match=r"^embeddings must be a torch.Tensor, got list"):
        miner(x.tolist(), torch.arange(8) // 2)
    a, p, n = miner(x, torch.as_tensor(BAD_LABELS[labels]))  # converted: fine
    assert a.shape == p.shape == n.shape


@pytest.mark.parametrize("labels", list(BAD_LABELS))
def test_loss_rejects_non_tensor_labels_with_a_type_error(labels):
    with pytest.raises(TypeError, match=r"^labels must be a torch.Tensor"):
        pddm_ext.PDDMLoss(4)(torch.randn(8, 4), BAD_LABELS[labels])
