"""The example scripts run as documented (tiny settings) and their pieces do what they say."""

from __future__ import annotations

import os
import runpy

import pytest
import torch

import pddm_ext
from helpers import make_unit, randn

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name):
    return runpy.run_path(os.path.join(EXAMPLES, name), run_name="example")


def test_full_matrix_loss_example_runs(capsys):
    ns = _load("full_matrix_loss.py")
    ns["main"].__globals__["STEPS_PER_EPOCH"] = 2
    ns["main"](["--dataset", "digits", "--epochs", "1", "--metric", "both"])
    out = capsys.readouterr().out
    assert "== pddm, seed 0" in out and "== cosine, seed 0" in out
    assert "by PDDM score" in out and "final test R@1, pddm" in out and "final test R@1, cosine" in out


@pytest.mark.parametrize("argv, option", [(["--seeds", "0", "0"], "--seeds"), (["--seeds", "-1"], "--seeds"),
                                          (["--epochs", "0"], "--epochs")])
def test_full_matrix_loss_example_refuses_bad_values(argv, option, capsys):
    """A repeated seed would be reported as a second sample of the mean; argparse stops first."""
    with pytest.raises(SystemExit) as exc:
        _load("full_matrix_loss.py")["main"](argv)
    assert exc.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_multi_similarity_loss_gradients_through_the_fused_backward():
    """The example's loss on unit(f): its gradients equal those through the reference's autograd
    graph, and only mined pairs carry a gradient (most of dS is zero once the loss has mined)."""
    loss_fn = _load("full_matrix_loss.py")["multi_similarity_loss"]
    unit = make_unit(6, 5, 4, seed=3)
    f0 = randn(40, 6, seed=4)
    labels = torch.arange(40) % 4
    f = f0.clone().requires_grad_()
    S = pddm_ext.pddm_scores(f, None, *unit.params())
    S.retain_grad()
    loss, frac = loss_fn(S, labels)
    loss.backward()
    fr = f0.clone().requires_grad_()
    loss_r, frac_r = loss_fn(pddm_ext.reference.pddm_scores(fr, None, list(unit.params())), labels)
    loss_r.backward()
    torch.testing.assert_close(loss, loss_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.grad, fr.grad, rtol=1e-8, atol=1e-10)
    assert frac == frac_r
    assert torch.count_nonzero(S.grad).item() / S.numel() == pytest.approx(frac)
