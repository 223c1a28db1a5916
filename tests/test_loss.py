"""docs/design.md#loss: PDDMLoss's value and gradients against the loss written by hand from the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pddm_ext
from pddm_ext import reference
from pddm_ext.reference import PARAM_NAMES
from helpers import randn


def hand_loss(embeddings, quads, params, alpha, beta, lam, normalize=True):
    """docs/design.md#loss steps 1, 3-6 on given quadruplets (i, j, k, l), with the reference's pair scores."""
    f = F.normalize(embeddings, dim=1) if normalize else embeddings
    i, j, k, l_ = quads.anchor, quads.positive, quads.anchor_negative, quads.positive_negative
    S_ij = reference.pair_scores(f[i], f[j], params)
    S_ik = reference.pair_scores(f[i], f[k], params)
    S_jl = reference.pair_scores(f[j], f[l_], params)
    E_m = torch.clamp(alpha + S_ik - S_ij, min=0) + torch.clamp(alpha + S_jl - S_ij, min=0)
    sq = lambda a, b: ((a - b) ** 2).sum(1)  # noqa: E731
    E_e = torch.clamp(beta + sq(f[i], f[j]) - sq(f[i], f[k]), min=0) + torch.clamp(
        beta + sq(f[i], f[j]) - sq(f[j], f[l_]), min=0
    )
    return E_m.mean() + lam * E_e.mean(), E_m.mean(), E_e.mean()


# The paper's loss (docs/design.md, "Loss"): the input-normalised unit without the pair term
PAPER = dict(normalize_inputs=True, bce_weight=0.0)


def make_loss(d, h=None, c=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    return pddm_ext.PDDMLoss(d, h, c, **{**PAPER, **kwargs}).double()


CASES = [
    # (m, d, h, c, classes, k, alpha, beta, lam, normalize)
    (16, 8, 6, 5, 4, 1, 0.5, 1.0, 0.5, True),
    (16, 8, 6, 5, 4, 3, 0.5, 1.0, 0.5, True),
    (24, 5, 7, 3, 6, None, 0.5, 1.0, 0.5, True),
    (20, 6, None, None, 5, 4, 1.5, 2.0, 1.0, True),
    (12, 4, 4, 4, 3, 2, 0.2, 0.3, 0.0, False),
    (18, 7, 5, 6, 2, None, 3.0, 4.0, 2.0, False),
]


@pytest.mark.parametrize("m,d,h,c,classes,k,alpha,beta,lam,normalize", CASES)
def test_loss_value_and_gradients_match_hand_written_loss(m, d, h, c, classes, k, alpha, beta, lam, normalize):
    loss_fn = make_loss(d, h, c, seed=m, alpha=alpha, beta=beta, lam=lam, k=k, normalize=normalize)
    x0 = randn(m, d, seed=m + 1)
    labels = torch.arange(m) % classes
    x = x0.clone().requires_grad_()
    loss = loss_fn(x, labels)
    loss.backward()
    quads = loss_fn.last_quadruplets
    assert quads is not None and quads.anchor.numel() > 0
    if k is not None:
        assert quads.anchor.numel() <= k

    # the quadruplets are those of mine_hard on the normalised, detached embeddings
    f = F.normalize(x0, dim=1) if normalize else x0
    mined = pddm_ext.mine_hard(f, labels, loss_fn.unit, k=k)
    for got, want in zip(quads[:4], mined[:4]):
        assert torch.equal(got, want)

    xr = x0.clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in loss_fn.unit.params()]
    want, want_metric, want_embedding = hand_loss(xr, quads, params, alpha, beta, lam, normalize)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_fn.last_metric_loss, want_metric.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_fn.last_embedding_loss, want_embedding.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-11)
    for name, p, pr in zip(PARAM_NAMES, loss_fn.unit.params(), params):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("k", [1, 3, None])
def test_loss_matches_reference_pddm_loss(k):
    loss_fn = make_loss(6, 5, 4, seed=3, k=k)
    x0 = randn(14, 6, seed=4)
    labels = torch.tensor([0, 1, 2, 3] * 3 + [0, 1])
    x = x0.clone().requires_grad_()
    loss = loss_fn(x, labels)
    loss.backward()
    xr = x0.clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in loss_fn.unit.params()]
    want, want_metric, want_embedding, quads = reference.pddm_loss(xr, labels, params, k=k)
    want.backward()
    for got, ref in zip(loss_fn.last_quadruplets[:4], quads[:4]):
        assert torch.equal(got, ref)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-11)
    for name, p, pr in zip(PARAM_NAMES, loss_fn.unit.params(), params):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_loss_float32_close_to_float64():
    torch.manual_seed(5)
    loss32 = pddm_ext.PDDMLoss(8, 6, 5, k=3)
    loss64 = pddm_ext.PDDMLoss(8, 6, 5, k=3)
    loss64.load_state_dict(loss32.state_dict())
    loss64.double()
    x = randn(16, 8, dtype=torch.float32, seed=6)
    labels = torch.arange(16) % 4
    l32, l64 = loss32(x, labels), loss64(x.double(), labels)
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), l64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("labels", [torch.arange(8), torch.zeros(8, dtype=torch.int64)], ids=["distinct", "one_class"])
def test_zero_loss_is_connected_to_the_graph(labels):
    """No quadruplet: the loss is a zero with a grad_fn; backward works and changes nothing."""
    loss_fn = make_loss(5, 4, 3, seed=7)
    x = randn(8, 5, seed=8).requires_grad_()
    loss = loss_fn(x, labels)
    assert loss.item() == 0.0
    assert loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0
    for name, p in loss_fn.unit.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    assert loss_fn.last_quadruplets.anchor.numel() == 0
    assert loss_fn.last_metric_loss.item() == 0.0 and loss_fn.last_embedding_loss.item() == 0.0


def test_zero_loss_in_a_larger_graph():
    """Added to another loss, the zero contributes nothing but keeps backward working."""
    loss_fn = make_loss(5, 4, 3, seed=9)
    lin = torch.nn.Linear(3, 5).double()
    inputs = randn(6, 3, seed=10)
    emb = lin(inputs)
    total = loss_fn(emb, torch.arange(6)) + emb.pow(2).mean()
    total.backward()
    emb2 = lin(inputs)
    grads = torch.autograd.grad(emb2.pow(2).mean(), list(lin.parameters()))
    # lin's gradients were accumulated once by total.backward(): they equal those of the second term
    for p, g in zip(lin.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_loss_reaches_embeddings_and_every_parameter():
    loss_fn = make_loss(6, 5, 4, seed=11, k=None, alpha=5.0, beta=5.0)  # large margins: every hinge active
    x = randn(12, 6, seed=12).requires_grad_()
    loss = loss_fn(x, torch.arange(12) % 3)
    loss.backward()
    assert loss.item() > 0
    assert torch.count_nonzero(x.grad) > 0
    for name, p in loss_fn.unit.named_parameters():
        assert p.grad is not None, name
        if name != "b_s":  # b_s cancels in S_ik - S_ij and S_jl - S_ij: its gradient is exactly 0
            assert torch.count_nonzero(p.grad) > 0, name


def test_parameters_are_the_units():
    loss_fn = pddm_ext.PDDMLoss(4)
    assert isinstance(loss_fn.unit, pddm_ext.PDDM)
    assert {n for n, _ in loss_fn.named_parameters()} == {f"unit.{n}" for n in PARAM_NAMES}


@pytest.mark.parametrize("value, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)])
def test_embedding_dim_is_validated_by_its_name(value, error):
    with pytest.raises(error, match="embedding_dim"):
        pddm_ext.PDDMLoss(value)
