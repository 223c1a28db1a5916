"""PDDMLoss's options against the unit's collapse (semi-hard negatives, the balanced BCE
pair term, the Euclidean warm-up), checked against brute-force loops and the reference scores."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import pddm_ext
from pddm_ext import reference
from pddm_ext.modules import balanced_pair_bce, semihard_negatives
from helpers import randn

# Options that reproduce the loss of docs/design.md#loss exactly (the paper's rule), whatever the defaults are.
PAPER = dict(k=1, negatives="hardest", bce_weight=0.0, warmup_steps=0, normalize_inputs=True)


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
    want = 0.5 * (mean(pos) + mean(neg)) if pos and neg else 0.0  # one kind of pair only: no term
    torch.testing.assert_close(balanced_pair_bce(S, labels), torch.as_tensor(want, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# PDDMLoss with the options, against the loss written by hand


def hand_loss(x, labels, params, quads, alpha, beta, lam, bce_weight, form):
    f = F.normalize(x, dim=1)
    i, j, k, l_ = quads
    S = lambda a, b: reference.pair_scores(a, b, params, normalize_inputs=form)  # noqa: E731
    E_m = torch.relu(alpha + S(f[i], f[k]) - S(f[i], f[j])) + torch.relu(alpha + S(f[j], f[l_]) - S(f[i], f[j]))
    sq = lambda a, b: ((a - b) ** 2).sum(1)  # noqa: E731
    E_e = torch.relu(beta + sq(f[i], f[j]) - sq(f[i], f[k])) + torch.relu(beta + sq(f[i], f[j]) - sq(f[j], f[l_]))
    loss = E_m.mean() + lam * E_e.mean()
    if bce_weight:
        loss = loss + bce_weight * balanced_pair_bce(reference.pddm_scores(f, None, params, normalize_inputs=form), labels)
    return loss


@pytest.mark.parametrize("form", [True, False])
@pytest.mark.parametrize("k,bce_weight", [(1, 0.0), (5, 0.7), (None, 2.0)])
def test_semihard_loss_matches_hand_written(k, bce_weight, form):
    m, d = 13, 6
    loss_fn = make_loss(d, seed=k or 0, k=k, negatives="semihard", bce_weight=bce_weight, warmup_steps=0,
                        normalize_inputs=form)
    x0 = randn(m, d, seed=5)
    labels = torch.arange(m) % 4
    x = x0.clone().requires_grad_()
    loss = loss_fn(x, labels)
    loss.backward()

    # pairs: those of the paper's rule (hardest first); negatives: the semi-hard loop on reference scores
    f = F.normalize(x0, dim=1)
    params = tuple(p.detach().clone() for p in loss_fn.unit.params())
    hard = pddm_ext.mine_hard(f, labels, loss_fn.unit, k=k)
    S = reference.pddm_scores(f, None, params, normalize_inputs=form)
    want_k, want_l = loop_semihard(S, labels[:, None] != labels[None, :], hard.anchor, hard.positive)
    quads = loss_fn.last_quadruplets
    assert torch.equal(quads.anchor, hard.anchor) and torch.equal(quads.positive, hard.positive)
    assert torch.equal(quads.anchor_negative, want_k) and torch.equal(quads.positive_negative, want_l)
    torch.testing.assert_close(quads.scores[:, 1], S[hard.anchor, want_k])

    xr = x0.clone().requires_grad_()
    pr = [p.clone().requires_grad_() for p in params]
    want = hand_loss(xr, labels, pr, quads[:4], loss_fn.alpha, loss_fn.beta, loss_fn.lam, bce_weight, form)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-8, atol=1e-10)
    for p, q in zip(loss_fn.unit.params(), pr):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10)
    if bce_weight:
        assert loss_fn.last_pair_loss is not None and float(loss_fn.last_pair_loss) > 0
    else:
        assert loss_fn.last_pair_loss is None


@pytest.mark.parametrize("form", [True, False])
def test_bce_weight_adds_the_pair_term_to_the_paper_loss(form):
    m, d = 11, 5
    x = randn(m, d, seed=9)
    labels = torch.arange(m) % 3
    plain = make_loss(d, seed=1, **{**PAPER, "normalize_inputs": form})
    with_bce = make_loss(d, seed=1, **{**PAPER, "bce_weight": 0.3, "normalize_inputs": form})
    f = F.normalize(x, dim=1)
    pair = balanced_pair_bce(reference.pddm_scores(f, None, tuple(plain.unit.params()), normalize_inputs=form), labels)
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
    (dict(negatives=None), TypeError, "negatives"),
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
    s, d, same = [], [], []
    for a in range(13):
        for b in range(a + 1, 13):
            s.append(float(reference.pair_scores(f[a:a + 1], f[b:b + 1], unit).detach()))
            d.append(-float(((f[a] - f[b]) ** 2).sum()))
            same.append(bool(labels[a] == labels[b]))
    assert got["pairs"] == 78
    assert got["spread"] == pytest.approx(float(torch.tensor(s, dtype=torch.float64).std()), rel=1e-9)
    assert got["auc_S"] == pytest.approx(roc_auc_score(same, s), rel=1e-12)
    assert got["auc_euclidean"] == pytest.approx(roc_auc_score(same, d), rel=1e-12)


def test_pair_diagnostics_of_a_wide_unit_score_fewer_rows():
    """The rows scored shrink with the unit's width (at most the work of 1000 rows of a 128-wide unit):
    a 4096-wide unit would otherwise spend minutes of every epoch on its diagnostics."""
    from pddm_ext.app.diagnostics import FLOP_BUDGET, MAX_ROWS, pair_diagnostics, rows_within_budget

    assert rows_within_budget(pddm_ext.PDDM(64)) == rows_within_budget(pddm_ext.PDDM(128)) == MAX_ROWS
    wide = pddm_ext.PDDM(256, 512, 384)  # h d + 2 h c = 512 (256 + 768) per pair, 2 FLOPs each
    rows = rows_within_budget(wide)
    assert 2 <= rows < MAX_ROWS
    per_pair = 2 * 512 * (256 + 2 * 384)
    assert (rows - 1) * (rows - 2) / 2 * per_pair <= FLOP_BUDGET < (rows + 1) * rows / 2 * per_pair
    got = pair_diagnostics(torch.randn(1200, 256), torch.arange(1200) % 4, wide)
    assert got["pairs"] == rows * (rows - 1) // 2


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


def test_defaults_are_the_evidence_based_recipe():
    loss_fn = pddm_ext.PDDMLoss(8)
    assert loss_fn.unit.normalize_inputs is False and loss_fn.bce_weight == 1.0
    assert loss_fn.k == 1 and loss_fn.negatives == "hardest" and loss_fn.warmup_steps == 0
    assert "bce_weight=1.0" in repr(loss_fn)


def test_old_state_dict_loads_as_the_input_normalised_unit():
    """A PDDMLoss state_dict from before these options (no _extra_state keys) loads into a loss with the new
    defaults as the unit it was: the input-normalised form, scores unchanged."""
    old = make_loss(6, **PAPER)
    state = {k: v for k, v in old.state_dict().items() if not k.endswith("_extra_state")}
    new = pddm_ext.PDDMLoss(6).double()
    new.load_state_dict(state)
    assert new.unit.normalize_inputs is True
    x = randn(7, 6, seed=1)
    torch.testing.assert_close(new.unit(x), old.unit(x))


# --------------------------------------------------------------------------------------------------
# pddm-ext train: diagnostics, collapse warning, augmentation, legacy checkpoints


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from pddm_ext.app import datasets as data

    return data.load_dataset("digits")


def test_train_logs_unit_diagnostics_every_epoch(digits, tmp_path, capsys):
    import json

    from pddm_ext.app.config import TrainConfig
    from pddm_ext.app.train import train

    cfg = TrainConfig(dataset="digits", epochs=2, batches_per_epoch=3, threads=1, out=str(tmp_path / "run"))
    result = train(cfg, progress=False, split=digits)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for entry in lines + result["history"]:
        unit = entry["unit"]
        for part in ("heldout", "unseen"):
            assert unit[part]["spread"] >= 0 and 0 <= unit[part]["auc_S"] <= 1 and 0 <= unit[part]["auc_euclidean"] <= 1
        assert unit["metric_loss"] == entry["mining"]["metric_loss"]
        assert isinstance(unit["collapsed"], bool)
    # 10% of each training class is held out: 5 classes, about 18 images each
    assert 80 <= lines[0]["unit"]["heldout"]["pairs"] <= 5000
    err = capsys.readouterr().err
    assert "unit: heldout spread" in err and "unseen spread" in err


def test_train_warns_when_the_unit_collapses(digits, tmp_path, capsys, monkeypatch):
    from pddm_ext.app import diagnostics
    from pddm_ext.app.config import TrainConfig
    from pddm_ext.app.train import train

    cfg = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=2, threads=1, out=str(tmp_path / "a"))
    monkeypatch.setattr(diagnostics, "COLLAPSE_SPREAD", 0.0)  # no unit counts as collapsed
    assert train(cfg, progress=False, split=digits)["history"][-1]["unit"]["collapsed"] is False
    assert "has collapsed" not in capsys.readouterr().err
    monkeypatch.setattr(diagnostics, "COLLAPSE_SPREAD", 1e9)  # every unit counts as collapsed
    result = train(dataclasses_replace(cfg, out=str(tmp_path / "b")), progress=False, split=digits)
    assert "warning: the PDDM unit has collapsed" in capsys.readouterr().err
    assert result["history"][-1]["unit"]["collapsed"] is True


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_batch_hard_has_no_unit_diagnostics(digits, tmp_path):
    from pddm_ext.app.config import TrainConfig
    from pddm_ext.app.train import train

    cfg = TrainConfig(dataset="digits", loss="batch-hard", epochs=1, batches_per_epoch=2, threads=1,
                      out=str(tmp_path / "bh"))
    assert "unit" not in train(cfg, progress=False, split=digits)["history"][-1]


def test_warmup_ends_when_the_unit_matches_euclidean_on_heldout_pairs(digits, tmp_path, monkeypatch):
    from pddm_ext.app import diagnostics
    from pddm_ext.app.config import TrainConfig
    from pddm_ext.app.train import Run

    cfg = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=2, warmup_steps=1000, threads=1,
                      out=str(tmp_path / "w"))
    run = Run(cfg, progress=False, split=digits)
    run.train_epoch(0)
    assert run.loss_fn.warmup_done == 2
    fake = dict(spread=0.5, auc_S=0.7, auc_euclidean=0.8, pairs=10)
    monkeypatch.setattr(diagnostics, "pair_diagnostics", lambda *a, **k: dict(fake))
    run.evaluate()
    assert run.loss_fn.warmup_done == 2  # the unit is behind: the warm-up goes on
    fake.update(auc_S=0.8)
    run.evaluate()
    assert run.loss_fn.warmup_done == 1000 and not run.loss_fn.warming_up


def test_old_checkpoint_resumes_with_the_old_behaviour(digits, tmp_path):
    """A checkpoint written before these options (no new config fields, no scheduler, no loss extra state)
    resumes as the run it was: no augmentation, constant lr, input-normalised unit, no pair term."""
    from pddm_ext.app.checkpoint import save_atomic
    from pddm_ext.app.config import LEGACY_DEFAULTS, TrainConfig
    from pddm_ext.app.train import train

    out = tmp_path / "old"
    cfg = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=2, threads=1, out=str(out), **LEGACY_DEFAULTS)
    train(cfg, progress=False, split=digits)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in LEGACY_DEFAULTS:
        del ckpt["config"][key]
    del ckpt["scheduler"]
    ckpt["loss"] = {k: v for k, v in ckpt["loss"].items() if not k.endswith("_extra_state")}
    save_atomic(ckpt, str(out / "checkpoint.pt"))
    result = train(dataclasses_replace(TrainConfig(dataset="digits", threads=1), epochs=2, out=str(out)),
                   resume=True, progress=False, split=digits)
    for key, value in LEGACY_DEFAULTS.items():
        assert result["config"][key] == value
    assert len(result["history"]) == 2


def test_random_affine_keeps_shape_and_moves_pixels():
    from pddm_ext.app.augment import random_affine

    x = torch.zeros(6, 1, 16, 16)
    x[:, :, 6:10, 4:12] = 1.0
    g = torch.Generator().manual_seed(0)
    y = random_affine(x, generator=g)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.allclose(y, x) and 0 < float(y.sum()) < 3 * float(x.sum())
    same = random_affine(x, degrees=0, translate=0, scale=(1, 1), shear=0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)  # the identity transform
    with pytest.raises(ValueError, match="x must be"):
        random_affine(torch.zeros(16, 16))


@pytest.mark.parametrize("args, message", [
    (["--bce-weight", "-1"], "bce_weight must be >= 0"),
    (["--warmup-steps", "-2"], "warmup_steps must be >= 0"),
    (["--holdout", "1.5"], "holdout must be in [0, 1)"),
])
def test_bad_new_train_options_are_one_line_errors(args, message, tmp_path, capsys):
    from pddm_ext.app.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pddm-ext: error: ") and message in err and not out.exists()


def test_compare_variants_and_paired_test(digits, tmp_path):
    from pddm_ext.app.compare import run_all
    from pddm_ext.app.config import TrainConfig

    base = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=2, threads=1)
    summary = run_all(base, ["pddm", "pddm-paper"], [0, 1], str(tmp_path / "cmp"), progress=False)
    runs = {r["seed"]: r for r in summary["losses"]["pddm-paper"]["runs"]}
    assert set(runs) == {0, 1}
    saved = json.loads((tmp_path / "cmp" / "runs" / "pddm-paper-seed0" / "result.json").read_text())
    assert saved["config"]["normalize_inputs"] is True and saved["config"]["bce_weight"] == 0.0
    t = summary["paired"]["pddm-paper"]
    a = summary["losses"]["pddm-paper"]["final"]["recall@1"]["values"]
    b = summary["losses"]["pddm"]["final"]["recall@1"]["values"]
    assert t["against"] == "pddm" and t["mean_difference"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / 2)
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "Paired test" in md
    assert "PDDM options of the first entry (pddm): negatives semihard" in md
    assert "pddm-paper: negatives hardest, bce_weight 0.0, normalize_inputs True" in md


def test_compare_reuses_a_baseline_run_whatever_the_pddm_options(digits, tmp_path):
    """A baseline (batch-hard) does not read the PDDM options: its finished run is reused when only
    they changed (e.g. a new default of negatives), and rerun when an option it reads changes."""
    import dataclasses

    from pddm_ext.app.compare import _finished
    from pddm_ext.app.config import TrainConfig
    from pddm_ext.app.train import train

    cfg = TrainConfig(dataset="digits", loss="batch-hard", epochs=1, batches_per_epoch=2, threads=1,
                      out=str(tmp_path / "bh"))
    train(cfg, progress=False, split=digits)
    assert _finished(dataclasses.replace(cfg, negatives="hardest", bce_weight=0.0, mining="euclidean")) is not None
    assert _finished(dataclasses.replace(cfg, beta=0.2)) is None
    pddm = dataclasses.replace(cfg, loss="pddm", out=str(tmp_path / "p"))
    train(pddm, progress=False, split=digits)
    assert _finished(dataclasses.replace(pddm, negatives="hardest")) is None  # a PDDM run does read them


def test_onecycle_resume_is_exact_for_an_unchanged_budget_and_runs_for_a_longer_one(digits, tmp_path):
    from pddm_ext.app.config import TrainConfig
    from pddm_ext.app.train import train

    base = TrainConfig(dataset="digits", epochs=2, batches_per_epoch=3, seed=1, threads=1, schedule="onecycle",
                       augment=True)
    straight = train(dataclasses_replace(base, out=str(tmp_path / "s")), progress=False, split=digits)
    # a second run of the same budget, then resumed with one more epoch: the first two epochs are those
    # of the straight run (the re-planned cycle: the next test)
    train(dataclasses_replace(base, out=str(tmp_path / "r")), progress=False, split=digits)
    ckpt_dir = tmp_path / "r"
    first = torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)
    assert first["scheduler"]["total_steps"] == 6
    longer = train(dataclasses_replace(base, epochs=3, out=str(ckpt_dir)), resume=True, progress=False, split=digits)
    assert len(longer["history"]) == 3
    drop = ("epoch_time", "train_time")
    assert [{k: v for k, v in h.items() if k not in drop} for h in longer["history"][:2]] == \
        [{k: v for k, v in h.items() if k not in drop} for h in straight["history"]]


def test_onecycle_resume_with_a_new_budget_replans_the_cycle(digits, tmp_path):
    """A one-cycle run resumed with a longer budget follows a straight run of the new budget from there
    on: the lr (and Adam's beta1) of every later optimiser step are the straight run's, annealing to
    lr / (25 * 1e4) at the last step, not those of the saved cycle's cosine run past its end (which
    climbs back towards the peak). Each change is recorded in the checkpoint and result.json; a resume
    of the same budget records nothing."""
    from pddm_ext.app.config import TrainConfig
    from pddm_ext.app.train import Run, one_cycle, train

    base = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=3, seed=1, threads=1, schedule="onecycle",
                       lr=1e-3)
    out = str(tmp_path / "r")
    first = train(dataclasses_replace(base, out=out), progress=False, split=digits)
    assert first["budget_changes"] == []

    def straight(total, done):  # a straight run's lr and beta1 for its optimiser step `done` (0-based)
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=base.lr)
        one_cycle(opt, [base.lr], total, done)
        return opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]

    # train() step by step, recording the lr and beta1 each optimiser step uses
    run = Run(dataclasses_replace(base, epochs=3, out=out), resume=True, progress=False, split=digits)
    used = []
    run.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0])))
    for epoch in run.epochs():
        entry = run.train_epoch(epoch)
        entry.update(run.evaluate())
        run.save(entry)
    longer = run.finish()
    assert len(longer["history"]) == 3 and len(used) == 6
    for step, values in zip(range(3, 9), used):
        assert values == pytest.approx(straight(9, step), rel=1e-6), step
    assert used[-1][0] == pytest.approx(base.lr / 25 / 1e4)  # annealed at the last step
    assert used[0][0] > 0.5 * base.lr  # the new cycle is past its peak at step 3 of 9, not near 0

    change = dict(after_epoch=1, epochs_before=1, epochs=3)
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert longer["budget_changes"] == ckpt["budget_changes"] == [change]
    # a second change is appended; a resume of the same budget adds none
    again = train(dataclasses_replace(base, epochs=4, out=out), resume=True, progress=False, split=digits)
    assert again["budget_changes"] == [change, dict(after_epoch=3, epochs_before=3, epochs=4)]
    same = train(dataclasses_replace(base, epochs=4, out=out), resume=True, progress=False, split=digits)
    assert same["budget_changes"] == again["budget_changes"]


def test_a_budget_change_with_nothing_left_to_train_is_recorded_in_the_checkpoint_too(digits, tmp_path, capsys):
    """A run interrupted after epoch 1 of 3 and resumed with --epochs 1 trains nothing more: the change
    (3 -> 1) is printed as such and recorded in result.json and in the rewritten checkpoint alike, so a
    later resume keeps budget 1 and the record."""
    from pddm_ext.app.config import TrainConfig
    from pddm_ext.app.train import train

    base = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=3, seed=1, threads=1, schedule="onecycle")
    out = str(tmp_path / "r")
    train(dataclasses_replace(base, out=out), progress=False, split=digits)
    ckpt_path = tmp_path / "r" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["config"]["epochs"] = 3  # as saved by a run of 3 epochs stopped after its first
    ckpt["scheduler"]["total_steps"] = 9
    torch.save(ckpt, ckpt_path)
    capsys.readouterr()
    ended = train(dataclasses_replace(base, epochs=1, out=out), resume=True, progress=False, split=digits)
    assert "changed from 3 to 1 epochs (recorded in budget_changes): nothing is left to train" in capsys.readouterr().err
    change = [dict(after_epoch=1, epochs_before=3, epochs=1)]
    saved = torch.load(ckpt_path, weights_only=True)
    assert ended["budget_changes"] == saved["budget_changes"] == change and saved["config"]["epochs"] == 1
    again = train(dataclasses_replace(base, out=out), resume=True, progress=False, split=digits, explicit=set())
    assert again["config"]["epochs"] == 1 and again["budget_changes"] == change


def test_budget_change_line_says_what_the_schedule_does():
    from pddm_ext.app.train import budget_change_line

    change = dict(after_epoch=1, epochs_before=1, epochs=3)
    onecycle = budget_change_line(change, ([4e-5, 4e-4], [9e-4, 9e-3]), "onecycle")
    assert "re-planned for 3 epochs; lr now 0.0009 (was 4e-05) / 0.009 (was 0.0004)" in onecycle
    assert "straight 3-epoch run would" in budget_change_line(change, None, "constant")


def test_a_cycle_replanned_for_other_steps_per_epoch_is_a_warning(digits, tmp_path, capsys):
    """Same budget but a saved cycle of another length (batches per epoch taken from other data): the
    cycle is re-planned for this run's steps, with a warning saying so; no budget change is recorded."""
    from pddm_ext.app.config import TrainConfig
    from pddm_ext.app.train import train

    base = TrainConfig(dataset="digits", epochs=1, batches_per_epoch=3, seed=1, threads=1, schedule="onecycle")
    out = str(tmp_path / "r")
    train(dataclasses_replace(base, out=out), progress=False, split=digits)
    ckpt_path = tmp_path / "r" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    # a run of 4 batches per epoch saved before its first step (only the cycle's length matters here)
    ckpt["scheduler"]["total_steps"], ckpt["scheduler"]["last_epoch"], ckpt["epoch"], ckpt["history"] = 4, 0, 0, []
    torch.save(ckpt, ckpt_path)
    capsys.readouterr()
    result = train(dataclasses_replace(base, out=out), resume=True, progress=False, split=digits)
    err = capsys.readouterr().err
    assert "warning: the one-cycle schedule is re-planned for 3 steps (3 batches per epoch), where the saved run " \
           "planned 4" in err, err
    assert result["budget_changes"] == [] and len(result["history"]) == 1
