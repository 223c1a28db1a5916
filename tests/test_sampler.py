"""PKSampler: classes_per_batch (P) and samples_per_class (K), by position or by name, the same batches
whatever the spelling; bad arguments are named in the error."""

from __future__ import annotations

import pytest
import torch

from pddm_ext import PKSampler

LABELS = torch.arange(6).repeat_interleave(5)[torch.randperm(30, generator=torch.Generator().manual_seed(0))]


def test_batches_are_p_classes_times_k_samples():
    sampler = PKSampler(LABELS, classes_per_batch=3, samples_per_class=4, seed=1)
    assert len(sampler) == 30 // 12
    for batch in sampler:
        assert len(batch) == 12
        labels = LABELS[batch]
        classes, counts = labels.unique(return_counts=True)
        assert len(classes) == 3 and counts.tolist() == [4, 4, 4]


def test_positional_and_keyword_spellings_give_the_same_batches():
    by_name = PKSampler(LABELS, classes_per_batch=3, samples_per_class=4, seed=2)
    assert (by_name.classes_per_batch, by_name.samples_per_class) == (3, 4)
    assert list(PKSampler(LABELS, 3, 4, seed=2)) == list(by_name)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(classes_per_batch=3, samples_per_class=1), ValueError, r"samples_per_class \(K\) must be >= 2"),
    (dict(classes_per_batch=7, samples_per_class=2), ValueError, r"classes_per_batch \(P\) must be between 1 and"),
    (dict(classes_per_batch=0, samples_per_class=2), ValueError, r"classes_per_batch \(P\)"),
    (dict(classes_per_batch=2.0, samples_per_class=2), TypeError, r"classes_per_batch must be an int"),
    (dict(classes_per_batch=2, samples_per_class=True), TypeError, r"samples_per_class must be an int"),
    (dict(classes_per_batch=2), TypeError, r"missing 1 required positional argument: 'samples_per_class'"),
])
def test_bad_arguments_name_themselves(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        PKSampler(LABELS, **kwargs)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(num_batches=1.5), TypeError, "num_batches must be an int or None, got float"),
    (dict(num_batches="3"), TypeError, "num_batches must be an int or None, got str"),
    (dict(num_batches=True), TypeError, "num_batches must be an int or None, got bool"),
    (dict(num_batches=0), ValueError, "num_batches must be >= 1, got 0"),
    (dict(num_batches=-1), ValueError, "num_batches must be >= 1, got -1"),
    (dict(seed="x"), TypeError, "seed must be an int or None, got str"),
    (dict(seed=1.9), TypeError, "seed must be an int or None, got float"),
    (dict(seed=2**64), ValueError, r"seed must be in \[-2\*\*63, 2\*\*64 - 1\], got 18446744073709551616"),
])
def test_num_batches_and_seed_are_checked_at_construction(kwargs, exc, pattern):
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with pytest.raises(exc, match=pattern):
        PKSampler(labels, 2, 2, **kwargs)


def test_numpy_ints_are_accepted_for_num_batches_and_seed():
    np = pytest.importorskip("numpy")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    s = PKSampler(labels, 2, 2, num_batches=np.int64(3), seed=np.int64(7))
    assert len(s) == 3 and list(s) == list(PKSampler(labels, 2, 2, num_batches=3, seed=7))


@pytest.mark.parametrize("labels", [["a", "b", "a", "b"], [object(), object()]])
def test_labels_that_are_not_integers_name_labels(labels):
    with pytest.raises(TypeError, match=r"^labels must be a 1-D sequence of integers"):
        PKSampler(labels, 2, 2)
