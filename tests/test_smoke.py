"""A smoke subset that runs against every torch the package claims (CI runs this file alone in a venv
with the oldest supported torch, `make oldest-torch`): import; scores, mining and the loss against the
plain reference; opcheck on every op; one training step of `pddm-ext train`. Odd sizes, float64."""

import pytest
import torch

import pddm_ext
from pddm_ext import reference

OPS = torch.ops.pddm_ext

QUAD_FIELDS = ("anchor", "positive", "anchor_negative", "positive_negative")


def _unit(d=5, seed=0):
    torch.manual_seed(seed)
    return pddm_ext.PDDM(d, 7, 3).double()


def _data(n=13, d=5, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def test_import_and_version():
    assert pddm_ext.__version__ and hasattr(torch.ops.pddm_ext, "scores")


def test_scores_and_their_gradients_match_the_reference():
    unit = _unit()
    x, _ = _data()
    y, _ = _data(n=6, seed=2)
    for other in (None, y):
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        got = pddm_ext.pddm_scores(xa, other, *unit.params())
        want = reference.pddm_scores(xb, other, list(unit.params()))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_mining_matches_the_reference(metric):
    unit = _unit()
    x, labels = _data()
    kwargs = dict(metric=metric) if metric == "euclidean" else {}
    u = None if metric == "euclidean" else unit
    with torch.no_grad():
        got = pddm_ext.mine_hard(x, labels, u, k=3, **kwargs)
        want = reference.mine_hard(x, labels, u, k=3, **kwargs)
        for field in QUAD_FIELDS:
            assert torch.equal(getattr(got, field), getattr(want, field)), field
        for g, w in zip(pddm_ext.batch_hard(x, labels, u, **kwargs), reference.batch_hard(x, labels, u, **kwargs)):
            assert torch.equal(g, w)


def test_loss_matches_the_reference():
    x, labels = _data(n=16)
    loss_fn = pddm_ext.PDDMLoss(5, 7, 3, k=2, bce_weight=0.0).double()  # the paper's loss (no pair term): reference.pddm_loss
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = loss_fn(xa, labels)
    want = reference.pddm_loss(xb, labels, loss_fn.unit, k=2)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    got.backward()
    want.backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-10)


def test_opcheck_every_op():
    unit = _unit(4)
    params = [p.detach() for p in unit.params()]
    x, lx = _data(n=7, d=4)
    y, ly = _data(n=5, d=4, seed=3)
    torch.library.opcheck(OPS.scores.default, (x.clone().requires_grad_(), None, *params))
    torch.library.opcheck(OPS.scores.default, (x, y, *params))
    torch.library.opcheck(OPS.scores_backward.default, (torch.ones(7, 5, dtype=torch.float64), x, y, *params,
                                                        [True, True, True]))
    torch.library.opcheck(OPS.mine_pddm.default, (x, lx, y, ly, *params, 2))
    torch.library.opcheck(OPS.mine_euclidean.default, (x, lx, None, None, -1))


def test_one_training_step(tmp_path):
    pytest.importorskip("sklearn")
    from pddm_ext.app.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batches-per-epoch", "1", "--threads", "1",
                 "--quiet", "--out", str(out)]) == 0
    assert (out / "checkpoint.pt").exists() and (out / "result.json").exists()
