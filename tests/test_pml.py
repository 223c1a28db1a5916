"""``PDDMMiner`` with the real pytorch-metric-learning (PML) library, and without it.

PML's API was checked against its installed source (2.x): ``BaseMiner.forward`` passes the
embeddings themselves as references in batch mode; ``TripletMarginLoss`` defaults to ``LpDistance``
(L2-normalised, p=2) and ``AvgNonZeroReducer``; ``CrossBatchMemory`` calls its miner in reference
mode with the whole queue (current batch included) and then drops self-comparisons.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pddm_ext
from pddm_ext import reference

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, losses, miners, samplers, trainers  # noqa: E402
from pytorch_metric_learning.utils import distributed as pml_dist  # noqa: E402


def pk_batch(P=4, K=4, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(P * K, d, dtype=dtype, generator=g), torch.arange(P).repeat_interleave(K)


def unit_for(d, seed=0):
    torch.manual_seed(seed)
    return pddm_ext.PDDM(d, dtype=torch.float64)


def check_reference_triplets(a, p, n, f, labels, f_ref, ref_labels, unit, tol=1e-5):
    """(a, p, n) are reference-mode mine_hard(k=None) triplets: every positive pair (a, p) once (a
    reference row equal to its anchor is none: docs/design.md#mining's self-copy rule), and n an argmax
    of S(f_a, .) over negatives, within the tolerance of docs/design.md#ties-and-tolerance."""
    S = reference.pddm_scores(f, f_ref, unit)
    positive = (labels[:, None] == ref_labels[None, :]) & ~(f[:, None, :] == f_ref[None, :, :]).all(-1)
    want_pairs = set(map(tuple, positive.nonzero().tolist()))
    got_pairs = list(zip(a.tolist(), p.tolist()))
    assert sorted(got_pairs) == sorted(want_pairs)
    best = torch.where(positive, -torch.inf, S).max(1).values
    assert not positive[a, n].any()
    assert ((best[a] - S[a, n]) <= tol * (1 + best[a].abs())).all()


# --- the miner ---------------------------------------------------------------------------------


def test_is_a_pml_miner_whose_triplets_are_mine_hards():
    x, labels = pk_batch()
    unit = unit_for(8)
    miner = pddm_ext.PDDMMiner(unit=unit, k=10)
    assert isinstance(miner, miners.BaseMiner)
    assert list(miner.parameters()) == []  # reads the unit, does not own it
    a, p, n = miner(x, labels)
    q = pddm_ext.mine_hard(F.normalize(x, dim=1), labels, unit, k=5)
    for got, want in zip((a, p, n), q.as_triplets()):
        assert torch.equal(got, want)
    # k counts triplets: the 10 of mine_hard's 5 hardest (unordered) pairs, 2 triplets per quadruplet
    assert len(a) == 10 and miner.num_triplets == 10
    # an odd k: the 5 hardest ordered pairs, i.e. both triplets of the 2 hardest pairs and the
    # (i, r, k) of the third (ties by (a, p): i < r comes first)
    a5, p5, n5 = pddm_ext.PDDMMiner(unit=unit, k=5)(x, labels)
    q3 = pddm_ext.mine_hard(F.normalize(x, dim=1), labels, unit, k=3)
    want = set(zip(*(t.tolist() for t in q3.as_triplets()))) - {(q3.positive[2].item(), q3.anchor[2].item(),
                                                                 q3.positive_negative[2].item())}
    assert set(zip(a5.tolist(), p5.tolist(), n5.tolist())) == want and len(a5) == 5
    assert (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all()

    a, p, n = pddm_ext.PDDMMiner(unit=unit, mode="batch_hard")(x, labels)
    for got, want in zip((a, p, n), pddm_ext.batch_hard(F.normalize(x, dim=1), labels, unit)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="mode must be one of"):
        pddm_ext.PDDMMiner(mode="hardest")
    with pytest.raises(ValueError, match=r"^k applies to mode='mine_hard' only .* got k=3"):
        pddm_ext.PDDMMiner(unit=unit, mode="batch_hard", k=3)  # batch_hard would ignore it
    with pytest.raises(ValueError, match="metric='pddm' needs a PDDM unit"):
        pddm_ext.PDDMMiner(metric="pddm")


def test_euclidean_batch_hard_mode_matches_pmls_batch_hard_miner():
    x, labels = pk_batch(P=5, K=3, d=6, seed=3)
    ours = pddm_ext.PDDMMiner(mode="batch_hard")(x, labels)  # unit=None: Euclidean
    theirs = miners.BatchHardMiner()(x, labels)
    order = torch.argsort(theirs[0])
    for got, want in zip(ours, (t[order] for t in theirs)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["batch_hard", "mine_hard"])
def test_the_embeddings_as_references_with_other_labels_are_mined_by_those_labels(mode):
    """PML's call with ref_emb = embeddings and different ref_labels: the positives and negatives follow
    ref_labels, as PML's BatchHardMiner's do; ref_emb = embeddings with the same labels stays batch mode."""
    x, labels = pk_batch(P=4, K=3, d=6, seed=5)
    ref_labels = torch.roll(labels, 1)
    for miner in (pddm_ext.PDDMMiner(mode=mode), pddm_ext.PDDMMiner(unit=unit_for(6, seed=5), mode=mode)):
        a, p, n = miner(x, labels, x, ref_labels)
        assert len(a) > 0 and torch.equal(labels[a], ref_labels[p]) and not (labels[a] == ref_labels[n]).any()
        batch = miner(x, labels)
        for got, want in zip(miner(x, labels, x, labels), batch):
            assert torch.equal(got, want)
    if mode == "batch_hard":
        theirs = miners.BatchHardMiner()(x, labels, x, ref_labels)
        ours = pddm_ext.PDDMMiner(mode=mode)(x, labels, x, ref_labels)
        assert sorted(zip(*(t.tolist() for t in ours))) == sorted(zip(*(t.tolist() for t in theirs)))


def test_triplet_margin_loss_on_mined_indices_matches_the_hand_computed_loss():
    x, labels = pk_batch(seed=1)
    x.requires_grad_(True)
    miner = pddm_ext.PDDMMiner(unit=unit_for(8, seed=1))
    a, p, n = miner(x, labels)
    loss = losses.TripletMarginLoss(margin=0.2)(x, labels, (a, p, n))

    f = F.normalize(x, dim=1)
    violation = (f[a] - f[p]).norm(dim=1) - (f[a] - f[n]).norm(dim=1) + 0.2
    hand = violation[violation > 0].mean()  # AvgNonZeroReducer: mean over violating triplets
    assert (violation > 0).sum() > 0
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=1e-12)
    g, = torch.autograd.grad(loss, x)
    g_hand, = torch.autograd.grad(hand, x)
    torch.testing.assert_close(g, g_hand, rtol=1e-10, atol=1e-12)


def test_reference_mode_indexes_ref_emb():
    x, labels = pk_batch(P=3, K=2, seed=2)
    y, ref_labels = pk_batch(P=4, K=5, seed=3)
    unit = unit_for(8, seed=2)
    a, p, n = pddm_ext.PDDMMiner(unit=unit)(x, labels, y, ref_labels)
    check_reference_triplets(a, p, n, F.normalize(x, dim=1), labels, F.normalize(y, dim=1), ref_labels, unit)


def test_pddm_loss_on_the_miners_triplets_is_the_pddm_loss():
    x, labels = pk_batch(P=5, K=3, seed=4)
    loss_fn = pddm_ext.PDDMLoss(8, k=3).double()
    miner = pddm_ext.PDDMMiner(unit=loss_fn.unit, k=2 * loss_fn.k)  # the miner counts triplets, the loss pairs
    via_miner = loss_fn(x, labels, miner(x, labels))
    torch.testing.assert_close(via_miner, loss_fn(x, labels), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="triplet tuple"):
        loss_fn(x, labels, miners.MultiSimilarityMiner()(x, labels))  # pairs, not triplets


# --- CrossBatchMemory, MetricLossOnly, DistributedMinerWrapper ----------------------------------


class RecordingMiner(pddm_ext.PDDMMiner):
    """Keeps each call's inputs and output for the brute-force check."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        out = super().mine(embeddings, labels, ref_emb, ref_labels)
        self.calls.append((embeddings.clone(), labels.clone(), ref_emb.clone(), ref_labels.clone(), out))
        return out


def test_cross_batch_memory_with_the_miner_matches_brute_force():
    torch.manual_seed(5)
    d, P, K = 8, 3, 4
    unit = unit_for(d, seed=5)
    model = torch.nn.Linear(10, d, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    miner = RecordingMiner(unit=unit)
    xbm = losses.CrossBatchMemory(losses.TripletMarginLoss(margin=0.1), d, memory_size=30, miner=miner)
    for it in range(5):  # 60 rows through a 30-row queue: it fills, then wraps
        data = torch.randn(P * K, 10, dtype=torch.float64)
        labels = torch.randperm(6)[:P].repeat_interleave(K)
        loss = xbm(model(data), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        emb, lab, ref_emb, ref_lab, (a, p, n) = miner.calls[-1]
        assert ref_emb.shape[0] == min(30, P * K * (it + 1))  # reference mode, the whole queue
        check_reference_triplets(a, p, n, F.normalize(emb, dim=1), lab, F.normalize(ref_emb, dim=1), ref_lab, unit)
    assert xbm.has_been_filled and len(miner.calls) == 5


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # PML's own progress bar
def test_metric_loss_only_trainer_runs_with_pddm_miner_and_loss():
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = torch.tensor(digits.data[:400], dtype=torch.float32) / 16
    labels = torch.tensor(digits.target[:400])
    dataset = torch.utils.data.TensorDataset(data, labels)
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    loss_fn = pddm_ext.PDDMLoss(16, k=4, bce_weight=0.0)  # without the pair term b_s gets no gradient
    miner = pddm_ext.PDDMMiner(unit=loss_fn.unit, k=8)
    # The loss has parameters (its PDDM unit): PML's trainer steps "<loss name>_optimizer" for them.
    optimizers = {
        "trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.1),
        "metric_loss_optimizer": torch.optim.SGD(loss_fn.parameters(), lr=0.1),
    }
    before = {name: p.detach().clone() for name, p in (*trunk.named_parameters(), *loss_fn.named_parameters())}
    seen = []
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk},
        optimizers=optimizers,
        batch_size=32,
        loss_funcs={"metric_loss": loss_fn},
        mining_funcs={"tuple_miner": miner},
        dataset=dataset,
        sampler=samplers.MPerClassSampler(labels, m=4, batch_size=32, length_before_new_iter=64),
        iterations_per_epoch=2,
        dataloader_num_workers=0,
        end_of_iteration_hook=lambda t: seen.append((t.losses["total_loss"].item(), miner.num_triplets)),
    )
    trainer.train(num_epochs=1)
    assert len(seen) == 2
    assert all(torch.isfinite(torch.tensor(loss)) and loss > 0 and n == 8 for loss, n in seen)
    # Both optimisers stepped. (b_s never moves: scores enter the hinge only as differences.)
    unchanged = [name for name, p in (*trunk.named_parameters(), *loss_fn.named_parameters())
                 if torch.equal(before[name], p.detach())]
    assert unchanged == ["unit.b_s"]


def test_distributed_miner_wrapper_accepts_the_miner(tmp_path):
    x, labels = pk_batch(seed=6)
    miner = pddm_ext.PDDMMiner(unit=unit_for(8, seed=6), k=3)
    wrapper = pml_dist.DistributedMinerWrapper(miner)  # raises TypeError for a non-BaseMiner
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        for got, want in zip(wrapper(x, labels), miner(x, labels)):
            assert torch.equal(got, want)
    finally:
        torch.distributed.destroy_process_group()
    # (2-process use of the wrapper: tests/test_distributed.py.)


# --- without PML --------------------------------------------------------------------------------


def test_without_pml_the_miner_is_a_plain_callable(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("pytorch_metric_learning")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)  # import now raises ImportError
    Miner = pddm_ext.integrations.miners._miner_class()
    assert not issubclass(Miner, torch.nn.Module)
    x, labels = pk_batch(seed=7)
    unit = unit_for(8, seed=7)
    for got, want in zip(Miner(unit=unit, k=2)(x, labels), pddm_ext.PDDMMiner(unit=unit, k=2)(x, labels)):
        assert torch.equal(got, want)
    y, ref_labels = pk_batch(seed=8)
    for got, want in zip(Miner(mode="batch_hard")(x, labels, y, ref_labels),
                         pddm_ext.batch_hard(F.normalize(x, dim=1), labels, ref_emb=F.normalize(y, dim=1),
                                             ref_labels=ref_labels)):
        assert torch.equal(got, want)


def test_package_imports_and_mines_without_pml():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["pytorch_metric_learning"] = None  # as if not installed
        import torch, pddm_ext
        miner = pddm_ext.PDDMMiner(k=2)
        assert not isinstance(miner, torch.nn.Module), type(miner).__mro__
        a, p, n = miner(torch.randn(8, 4), torch.arange(4).repeat(2))
        assert len(a) == 2, (a, p, n)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_example_script_runs(monkeypatch, capsys):
    import os
    import runpy

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "pml_trainer.py")
    monkeypatch.setattr(sys, "argv", [script, "--epochs", "1"])
    runpy.run_path(script, run_name="__main__")  # in-process: torch and PML are already imported
    out = capsys.readouterr().out
    assert "epoch 1: loss" in out and "precision@1" in out


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--epochs", "-3"], ["--seed", "-1"]])
def test_the_example_script_refuses_bad_values(argv, monkeypatch, capsys):
    """--epochs 0 trained nothing and exited 0: argparse stops it with exit 2, naming the option."""
    import os
    import runpy

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "pml_trainer.py")
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(script, run_name="__main__")
    assert exc.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err
