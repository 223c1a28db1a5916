"""Issue 13: PDDMLoss's options against the unit's collapse (semi-hard negatives, the balanced BCE
pair term, the Euclidean warm-up), checked against brute-force loops and the reference scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pddm_ext
from pddm_ext import reference
from pddm_ext.modules import balanced_pair_bce, semihard_negatives
from conftest import randn

# Options that reproduce the loss of SPEC §4 exactly (the paper's rule), whatever the defaults are.
PAPER = dict(k=1, negatives="hardest", bce_weight=0.0, warmup_steps=0)


def make_loss(d, seed=0, **kwargs):
    torch.manual_seed(seed)
    return pddm_ext.PDDMLoss(d, **kwargs).double()


# --------------------------------------------------------------------------------------------------
# semihard_negatives against a loop over candidates


def loop_semihard(S, negative, i, r):
    def pick(values, is_neg, bound):
        cands = [c for c in range(len(values)) if is_neg[c]]
        if not cands:
            return -1
        semi = [c for c in cands if values[c] < bound]
        if semi:
            best = max(values[c] for c in semi)
            return min(c for c in semi if values[c] == best)
        worst = min(values[c] for c in cands)
        return min(c for c in cands if values[c] == worst)

    k = [pick(S[a].tolist(), negative[a].tolist(), float(S[a, b])) for a, b in zip(i.tolist(), r.tolist())]
    l_ = [pick(S[:, b].tolist(), negative[:, b].tolist(), float(S[a, b])) for a, b in zip(i.tolist(), r.tolist())]
    return torch.tensor(k), torch.tensor(l_)


@pytest.mark.parametrize("m,n,classes,seed", [(7, 7, 3, 0), (9, 13, 4, 1), (5, 11, 2, 2), (6, 6, 1, 3)])
def test_semihard_negatives_match_loop(m, n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(m, n, generator=g, dtype=torch.float64).round(decimals=1)  # rounding makes ties
    lx = torch.randint(classes, (m,), generator=g)
    ly = torch.randint(classes, (n,), generator=g)
    negative = lx[:, None] != ly[None, :]
    i, r = torch.nonzero(~negative, as_tuple=True)
    k, l_ = semihard_negatives(S, negative, i, r)
    want_k, want_l = loop_semihard(S, negative, i, r)
    assert torch.equal(k, want_k.long().reshape(k.shape)) and torch.equal(l_, want_l.long().reshape(l_.shape))
    # every pick that is a semi-hard one ranks below its positive pair
    for t in range(len(i)):
        if k[t] >= 0 and S[i[t], k[t]] < S[i[t], r[t]]:
            assert negative[i[t], k[t]]


def test_semihard_negative_falls_back_to_least_similar():
    S = torch.tensor([[0.0, 0.9, 0.8, 0.5]], dtype=torch.float64)  # every negative above S[0, 1]?
    negative = torch.tensor([[False, False, True, True]])
    S[0, 1] = 0.1  # the positive pair; both negatives (0.8, 0.5) score higher: no semi-hard one
    k, _ = semihard_negatives(S, negative, torch.tensor([0]), torch.tensor([1]))
    assert k.tolist() == [3]  # the least similar negative
    S[0, 1] = 0.6  # now 0.5 is below the positive pair and is the highest such
    k, _ = semihard_negatives(S, negative, torch.tensor([0]), torch.tensor([1]))
    assert k.tolist() == [3]
    S[0, 1] = 0.85
    k, _ = semihard_negatives(S, negative, torch.tensor([0]), torch.tensor([1]))
    assert k.tolist() == [2]


# --------------------------------------------------------------------------------------------------
# balanced_pair_bce against a loop


@pytest.mark.parametrize("m,classes", [(7, 3), (10, 5), (5, 5), (6, 1)])
def test_balanced_pair_bce_matches_loop(m, classes):
    S = randn(m, m, seed=m)
    labels = torch.arange(m) % classes
    pos, neg = [], []
    for a in range(m):
        for b in range(a + 1, m):
            s = float(S[a, b])
            if labels[a] == labels[b]:
                pos.append(-torch.log(torch.sigmoid(torch.tensor(s, dtype=torch.float64))))
            else:
                neg.append(-torch.log(1 - torch.sigmoid(torch.tensor(s, dtype=torch.float64))))
    mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    want = 0.5 * (mean(pos) + mean(neg))
    torch.testing.assert_close(balanced_pair_bce(S, labels), torch.as_tensor(want, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# PDDMLoss with the options, against the loss written by hand


def hand_loss(x, labels, params, quads, alpha, beta, lam, bce_weight):
    f = F.normalize(x, dim=1)
    i, j, k, l_ = quads
    S = lambda a, b: reference.pair_scores(a, b, params)  # noqa: E731
    E_m = torch.relu(alpha + S(f[i], f[k]) - S(f[i], f[j])) + torch.relu(alpha + S(f[j], f[l_]) - S(f[i], f[j]))
    sq = lambda a, b: ((a - b) ** 2).sum(1)  # noqa: E731
    E_e = torch.relu(beta + sq(f[i], f[j]) - sq(f[i], f[k])) + torch.relu(beta + sq(f[i], f[j]) - sq(f[j], f[l_]))
    loss = E_m.mean() + lam * E_e.mean()
    if bce_weight:
        loss = loss + bce_weight * balanced_pair_bce(reference.pddm_scores(f, None, params), labels)
    return loss


@pytest.mark.parametrize("k,bce_weight", [(1, 0.0), (5, 0.7), (None, 2.0)])
def test_semihard_loss_matches_hand_written(k, bce_weight):
    m, d = 13, 6
    loss_fn = make_loss(d, seed=k or 0, k=k, negatives="semihard", bce_weight=bce_weight, warmup_steps=0)
    x0 = randn(m, d, seed=5)
    labels = torch.arange(m) % 4
    x = x0.clone().requires_grad_()
    loss = loss_fn(x, labels)
    loss.backward()

    # pairs: those of the paper's rule (hardest first); negatives: the semi-hard loop on reference scores
    f = F.normalize(x0, dim=1)
    params = tuple(p.detach().clone() for p in loss_fn.unit.params())
    hard = pddm_ext.mine_hard(f, labels, loss_fn.unit, k=k)
    S = reference.pddm_scores(f, None, params)
    want_k, want_l = loop_semihard(S, labels[:, None] != labels[None, :], hard.anchor, hard.positive)
    quads = loss_fn.last_quadruplets
    assert torch.equal(quads.anchor, hard.anchor) and torch.equal(quads.positive, hard.positive)
    assert torch.equal(quads.anchor_negative, want_k) and torch.equal(quads.positive_negative, want_l)
    torch.testing.assert_close(quads.scores[:, 1], S[hard.anchor, want_k])

    xr = x0.clone().requires_grad_()
    pr = [p.clone().requires_grad_() for p in params]
    want = hand_loss(xr, labels, pr, quads[:4], loss_fn.alpha, loss_fn.beta, loss_fn.lam, bce_weight)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-8, atol=1e-10)
    for p, q in zip(loss_fn.unit.params(), pr):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10)
    if bce_weight:
        assert loss_fn.last_pair_loss is not None and float(loss_fn.last_pair_loss) > 0
    else:
        assert loss_fn.last_pair_loss is None


def test_bce_weight_adds_the_pair_term_to_the_paper_loss():
    m, d = 11, 5
    x = randn(m, d, seed=9)
    labels = torch.arange(m) % 3
    plain = make_loss(d, seed=1, **PAPER)
    with_bce = make_loss(d, seed=1, **{**PAPER, "bce_weight": 0.3})
    f = F.normalize(x, dim=1)
    pair = balanced_pair_bce(reference.pddm_scores(f, None, tuple(plain.unit.params())), labels)
    torch.testing.assert_close(with_bce(x, labels), plain(x, labels) + 0.3 * pair)
    torch.testing.assert_close(with_bce.last_pair_loss, pair.detach())
    # the pair term also joins the loss on given triplets (indices_tuple)
    a, p, n = torch.tensor([0]), torch.tensor([3]), torch.tensor([1])
    torch.testing.assert_close(with_bce(x, labels, (a, p, n)), plain(x, labels, (a, p, n)) + 0.3 * pair)


def test_all_positive_pairs_mined_with_k_none():
    loss_fn = make_loss(4, **{**PAPER, "k": None})
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # 3 + 1 + 6 positive pairs
    loss_fn(randn(9, 4, seed=2), labels)
    assert loss_fn.last_quadruplets.anchor.numel() == 10


# --------------------------------------------------------------------------------------------------
# warm-up


def test_warmup_mines_by_euclidean_distance_then_by_the_unit():
    m, d = 12, 5
    labels = torch.arange(m) % 3
    loss_fn = make_loss(d, **{**PAPER, "k": 2, "warmup_steps": 2})
    mined = []
    for step in range(4):
        x = randn(m, d, seed=step)
        f = F.normalize(x, dim=1)
        metric = "euclidean" if step < 2 else "pddm"
        want = pddm_ext.mine_hard(f, labels, loss_fn.unit, k=2, metric=metric)
        other = pddm_ext.mine_hard(f, labels, loss_fn.unit, k=2, metric="pddm" if step < 2 else "euclidean")
        assert loss_fn.warming_up == (step < 2)
        loss_fn(x, labels)
        got = loss_fn.last_quadruplets
        assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))
        mined.append(not all(torch.equal(a, b) for a, b in zip(want[:4], other[:4])))
    assert any(mined)  # the two metrics disagree on some batch, so the check can tell them apart
    assert loss_fn.warmup_done == 2


def test_warmup_counts_training_calls_only_and_ends_early():
    loss_fn = make_loss(4, **{**PAPER, "warmup_steps": 5})
    x, labels = randn(8, 4, seed=0), torch.arange(8) % 2
    loss_fn.eval()
    assert not loss_fn.warming_up
    loss_fn(x, labels)
    loss_fn.train()
    assert loss_fn.warmup_done == 0 and loss_fn.warming_up
    loss_fn(x, labels)
    assert loss_fn.warmup_done == 1
    loss_fn.end_warmup()
    assert not loss_fn.warming_up


def test_warmup_progress_survives_the_state_dict_and_old_state_dicts_load():
    loss_fn = make_loss(4, **{**PAPER, "warmup_steps": 5})
    loss_fn(randn(8, 4, seed=0), torch.arange(8) % 2)
    state = loss_fn.state_dict()
    fresh = make_loss(4, seed=7, **{**PAPER, "warmup_steps": 5})
    fresh.load_state_dict(state)
    assert fresh.warmup_done == 1
    # a state_dict from before the option: only parameters; it loads, with no warm-up left to do
    old = {k: v for k, v in state.items() if k.startswith("unit.") and not k.endswith("_extra_state")}
    fresh = make_loss(4, seed=7, **{**PAPER, "warmup_steps": 5})
    fresh.load_state_dict(old)
    assert not fresh.warming_up
    for name in ("W_u", "w_s"):
        assert torch.equal(getattr(fresh.unit, name), getattr(loss_fn.unit, name))
    bad = dict(state, _extra_state={"warmup_done": "two"})
    with pytest.raises(ValueError, match="warmup_done"):
        fresh.load_state_dict(bad)


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(negatives="semi-hard"), ValueError, "negatives"),
    (dict(negatives=None), ValueError, "negatives"),
    (dict(bce_weight=-0.1), ValueError, "bce_weight"),
    (dict(bce_weight=float("nan")), ValueError, "bce_weight"),
    (dict(bce_weight="1"), TypeError, "bce_weight"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (dict(warmup_steps=1.5), TypeError, "warmup_steps"),
    (dict(warmup_steps=True), TypeError, "warmup_steps"),
    (dict(k=0), ValueError, "k"),
])
def test_bad_options_raise_naming_the_option(kwargs, error, match):
    with pytest.raises(error, match=match):
        pddm_ext.PDDMLoss(4, **kwargs)


def test_semihard_warmup_picks_negatives_by_euclidean_distance():
    m, d = 14, 5
    labels = torch.arange(m) % 4
    x = randn(m, d, seed=11)
    f = F.normalize(x, dim=1)
    loss_fn = make_loss(d, **{**PAPER, "k": None, "negatives": "semihard", "warmup_steps": 1})
    loss_fn(x, labels)
    quads = loss_fn.last_quadruplets
    hard = pddm_ext.mine_hard(f, labels, loss_fn.unit, k=None, metric="euclidean")
    S = reference.euclidean_scores(f)
    want_k, want_l = loop_semihard(S, labels[:, None] != labels[None, :], hard.anchor, hard.positive)
    assert torch.equal(quads.anchor_negative, want_k) and torch.equal(quads.positive_negative, want_l)


# --------------------------------------------------------------------------------------------------
# diagnostics (pddm_ext.app.diagnostics)


def test_pair_diagnostics_match_loop_over_pairs():
    from sklearn.metrics import roc_auc_score

    from pddm_ext.app.diagnostics import pair_diagnostics

    torch.manual_seed(0)
    unit = pddm_ext.PDDM(5).double()
    x = randn(13, 5, seed=4)
    labels = torch.arange(13) % 3
    got = pair_diagnostics(x, labels, unit)
    f = F.normalize(x, dim=1)
    params = tuple(p.detach() for p in unit.params())
    s, d, same = [], [], []
    for a in range(13):
        for b in range(a + 1, 13):
            s.append(float(reference.pair_scores(f[a:a + 1], f[b:b + 1], params)))
            d.append(-float(((f[a] - f[b]) ** 2).sum()))
            same.append(bool(labels[a] == labels[b]))
    assert got["pairs"] == 78
    assert got["spread"] == pytest.approx(float(torch.tensor(s, dtype=torch.float64).std()), rel=1e-9)
    assert got["auc_S"] == pytest.approx(roc_auc_score(same, s), rel=1e-12)
    assert got["auc_euclidean"] == pytest.approx(roc_auc_score(same, d), rel=1e-12)


def test_pair_diagnostics_sample_rows_and_one_class():
    from pddm_ext.app.diagnostics import COLLAPSE_SPREAD, collapsed, pair_diagnostics

    unit = pddm_ext.PDDM(4)
    x = torch.randn(30, 4)
    got = pair_diagnostics(x, torch.arange(30) % 2, unit, max_rows=7)
    assert got["pairs"] == 21
    one = pair_diagnostics(x, torch.zeros(30, dtype=torch.long), unit)
    assert one["auc_S"] is None and one["auc_euclidean"] is None
    # a unit with w_s = 0 scores every pair alike: collapsed
    with torch.no_grad():
        unit.w_s.zero_()
    flat = pair_diagnostics(x, torch.arange(30) % 2, unit)
    assert flat["spread"] < COLLAPSE_SPREAD and collapsed(flat)
    assert not collapsed(dict(flat, spread=0.5))
