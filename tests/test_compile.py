"""A training step with PDDMLoss and unit(x) compiles as one graph (fullgraph=True).

mine_hard returns a data-dependent number of quadruplets: its ops' fake kernels allocate that size
with ctx.new_dynamic_size() (an unbacked symbolic size), and the loss has no Python branch on it, so
dynamo traces the whole step without a graph break. The compiled step must also reproduce eager
results when a later batch mines a different number of quadruplets (including none) without
recompiling for it.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pddm_ext


class Model(torch.nn.Module):
    def __init__(self, d_in=6, d=8):
        super().__init__()
        self.embed = torch.nn.Linear(d_in, d)
        self.loss = pddm_ext.PDDMLoss(d, 6, 5, k=3)

    def step_loss(self, inputs, labels):
        """PDDMLoss (mining + double-header + embedding loss) plus a term on all-pairs unit(x) scores."""
        emb = self.embed(inputs)
        scores = self.loss.unit(torch.nn.functional.normalize(emb, dim=1))
        return self.loss(emb, labels) + 0.1 * scores.mean()


def _batches():
    g = torch.Generator().manual_seed(0)
    pk = torch.arange(6).repeat_interleave(2)  # P x K = 6 x 2
    return [
        (torch.randn(12, 6, generator=g), pk),
        (torch.randn(12, 6, generator=g), pk[torch.randperm(12, generator=g)]),
        (torch.randn(12, 6, generator=g), torch.arange(12)),  # no positive pair: zero PDDMLoss
        (torch.randn(12, 6, generator=g), torch.zeros(12, dtype=torch.int64)),  # no negative
    ]


def _train(model, step_loss, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for inputs, labels in batches:
        opt.zero_grad()
        loss = step_loss(inputs, labels)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("backend", ["inductor"])
def test_compiled_training_step_fullgraph(backend):
    torch.manual_seed(0)
    eager = Model()
    compiled = copy.deepcopy(eager)
    batches = _batches()
    torch.compiler.reset()
    try:
        step = torch.compile(compiled.step_loss, fullgraph=True, backend=backend)
        got = _train(compiled, step, batches)
    finally:
        torch.compiler.reset()
    want = _train(eager, eager.step_loss, batches)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # the zero-loss batches are still connected: their step ran backward through the loss
    assert compiled.loss.last_quadruplets.anchor.numel() == 0


def test_compiled_calls_raise_on_nan_instead_of_returning_plausible_results():
    """Inside a compiled graph the finiteness checks are asynchronous asserts
    (torch._assert_async), so a NaN in any input or parameter raises (RuntimeError with the message
    naming the argument) instead of giving indices in which the NaN row looks like a hard negative."""
    torch.manual_seed(0)
    loss_fn = pddm_ext.PDDMLoss(6, k=3)
    unit = loss_fn.unit
    labels = torch.arange(10) % 3

    def step(a, b, c, d):
        hardest = pddm_ext.batch_hard(a, labels)
        quads = pddm_ext.mine_hard(b, labels, unit, k=4)
        return hardest, quads.anchor, unit(c), loss_fn(d, labels)

    inputs = [torch.randn(10, 6) for _ in range(4)]
    torch.compiler.reset()
    try:
        compiled = torch.compile(step)
        got, want = compiled(*inputs), step(*inputs)
        for g, w in zip(got[0], want[0]):
            assert torch.equal(g, w)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[2], want[2])
        torch.testing.assert_close(got[3], want[3])
        for position, name in enumerate(["embeddings", "embeddings", "x", "embeddings"]):
            bad = [t.clone() for t in inputs]
            bad[position][4, 2] = float("nan")
            with pytest.raises(RuntimeError, match=f"{name} contains NaN or Inf"):
                compiled(*bad)
            with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):  # eager: unchanged
                step(*bad)
        with torch.no_grad():
            unit.W_u[1, 1] = float("inf")
        with pytest.raises(RuntimeError, match="W_u contains NaN or Inf"):
            compiled(*inputs)
    finally:
        torch.compiler.reset()
