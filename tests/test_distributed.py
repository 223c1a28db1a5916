"""``pddm_ext.distributed`` and ``PDDMLoss(distributed=True)`` on 2 processes (gloo, CPU, torchrun).

The contract tested (see ``pddm_ext.distributed``): each rank holds a slice of the global batch X;
the loss mines over X (``all_gather``, local slice keeping its graph), returns the single-process
loss L(X), and scales the gradient reaching its own slice by the world size W. DDP then averages
gradients over ranks, i.e. divides their sum by W:

* backbone parameters: rank r holds W dL/dx_r dx_r/dphi; the average is sum_r dL/dx_r dx_r/dphi = dL/dphi;
* PDDM unit parameters: every rank holds the full dL/dtheta (it scores all gathered rows); the
  average of W identical copies is dL/dtheta;

so after ``backward()`` every ``.grad`` equals single-process training on X (1e-6 asked; float64 gives
far better), and so do the parameters after one SGD step. Ranks get unequal slices (9 and 7 rows) so
the padded all_gather is exercised.

This file is also the worker: ``torchrun --nproc_per_node 2 tests/test_distributed.py OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import pddm_ext

D_IN, D, P, K, SLICES = 6, 8, 4, 4, (9, 7)
TIMEOUT_S = 240


def build(distributed):
    """The same data and initial parameters on every process."""
    torch.manual_seed(0)
    data = torch.randn(P * K, D_IN, dtype=torch.float64)
    labels = torch.arange(P).repeat_interleave(K)[torch.randperm(P * K)]
    backbone = torch.nn.Linear(D_IN, D, dtype=torch.float64)
    loss_fn = pddm_ext.PDDMLoss(D, k=3, distributed=distributed).double()
    return data, labels, backbone, loss_fn


def one_step(backbone, loss_fn, data, labels):
    """Forward, backward, SGD step: returns (loss, quadruplets, grads, params after the step)."""
    params = [*backbone.parameters(), *loss_fn.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    loss = loss_fn(backbone(data), labels)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    opt.step()
    quads = loss_fn.last_quadruplets if hasattr(loss_fn, "last_quadruplets") else loss_fn.module.last_quadruplets
    return loss.detach(), tuple(quads[:4]), grads, [p.detach().clone() for p in params]


def worker(out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == len(SLICES)
    data, labels, backbone, loss_fn = build(distributed=True)
    start = sum(SLICES[:rank])
    mine = slice(start, start + SLICES[rank])
    result = {}

    # all_gather: rank order, the local slice keeps its graph, the others are constants.
    x = data[mine].clone().requires_grad_(True)
    gathered = pddm_ext.distributed.all_gather(x * 1)
    result["gathered"] = gathered.detach()
    (gathered ** 2).sum().backward()
    result["gather_grad"] = x.grad

    # PDDMLoss(distributed=True) with DDP on the backbone and on the loss (its unit's parameters).
    backbone, loss_fn = DDP(backbone), DDP(loss_fn)
    result["step"] = one_step(backbone, loss_fn, data[mine], labels[mine])

    # PML's DistributedMinerWrapper with our miner: it mines on cat(local, other ranks in order).
    # PML's all_gather needs equal slices: 8 rows each here.
    from pytorch_metric_learning.utils.distributed import DistributedMinerWrapper

    _, _, backbone0, loss0 = build(False)  # the initial parameters, before the step
    half = slice(8 * rank, 8 * rank + 8)
    with torch.no_grad():
        emb = backbone0(data[half])
    result["pml_wrapper"] = DistributedMinerWrapper(pddm_ext.PDDMMiner(unit=loss0.unit, k=4))(emb, labels[half])
    # Without DDP, with a memory bank: the raw per-rank gradients the contract describes.
    result["memory"] = memory_steps(rank)
    result["wrapper"] = wrapper_step(rank)
    result["ref"] = ref_step(rank)
    result["sharded"] = list(pddm_ext.distributed.ShardedBatchSampler(pddm_ext.PKSampler(labels, 3, 4, seed=0)))
    # pddm-ext train's DDP wiring (pddm_ext.app.ddp.wrap), as Run.setup calls it
    from pddm_ext.app import ddp

    net, loss, batches = ddp.wrap(torch.nn.Linear(D_IN, D), pddm_ext.PDDMLoss(D, k=3),
                                  pddm_ext.PKSampler(labels, 3, 4, seed=0), torch.device("cpu"), world)
    result["app_wrap"] = [type(net).__name__, type(loss).__name__, type(getattr(loss, "module", None)).__name__,
                          type(batches).__name__]
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))

    # The training loop inside a process group the caller made (it stays up), with a loss that has
    # no parameters (no DDP around it): rank 0 alone writes.
    from pddm_ext.app.cli import main

    assert main(["train", "--dataset", "digits", "--loss", "batch-hard", "--epochs", "1", "--batches-per-epoch", "2",
                 "--threads", "1", "--quiet", "--out", os.path.join(out_dir, "batch-hard")]) == 0
    assert dist.is_initialized()
    dist.destroy_process_group()


def memory_steps(rank=None):
    """Two steps of PDDMLoss(memory=bank): batch mode (empty bank), then against the bank.
    rank=None: one process on the whole batches. Returns per step (loss, quads, dL/dx slice, dL/dtheta)."""
    torch.manual_seed(1)
    bank = pddm_ext.MemoryBank(64, D)
    loss_fn = pddm_ext.PDDMLoss(D, k=3, memory=bank, distributed=rank is not None).double()
    steps = []
    for _ in range(2):
        x = torch.randn(P * K, D, dtype=torch.float64)
        labels = torch.arange(P).repeat_interleave(K)[torch.randperm(P * K)]
        if rank is not None:
            start = sum(SLICES[:rank])
            x, labels = x[start:start + SLICES[rank]], labels[start:start + SLICES[rank]]
        x.requires_grad_(True)
        loss = loss_fn(x, labels)
        grads = torch.autograd.grad(loss, [x, *loss_fn.parameters()])
        steps.append((loss.detach(), tuple(loss_fn.last_quadruplets[:4]), grads[0], grads[1:]))
    return steps


def wrapper_step(rank=None):
    """GlobalBatchLoss around a plain PDDMLoss, each rank taking shard() (rows rank, rank + W, ...) of
    the batch; rank=None: one process on the batch in gathered order (rank 0's rows, then rank 1's).
    Returns (loss, quads, dL/dx of the process's rows, dL/dtheta)."""
    data, labels, backbone, loss_fn = build(distributed=False)
    emb = backbone(data).detach()
    if rank is None:
        order = torch.cat([torch.arange(r, P * K, len(SLICES)) for r in range(len(SLICES))])
        x, y = emb[order], labels[order]
    else:
        x, y = emb[pddm_ext.distributed.shard(torch.arange(P * K))], labels[pddm_ext.distributed.shard(torch.arange(P * K))]
    x.requires_grad_(True)
    loss = pddm_ext.distributed.GlobalBatchLoss(loss_fn)(x, y)
    grads = torch.autograd.grad(loss, [x, *loss_fn.parameters()])
    return loss.detach(), tuple(loss_fn.last_quadruplets[:4]), grads[0], grads[1:]


def ref_step(rank=None):
    """PDDMLoss(distributed=True)(x, labels, ref_emb=y, ref_labels=...): queries and references are
    both gathered. Returns (loss, quads, dL/dtheta)."""
    torch.manual_seed(2)
    loss_fn = pddm_ext.PDDMLoss(D, k=4, distributed=rank is not None).double()
    x, y = torch.randn(P * K, D, dtype=torch.float64), torch.randn(12, D, dtype=torch.float64)
    lx, ly = torch.arange(P).repeat_interleave(K), torch.arange(6).repeat(2)
    if rank is not None:
        x, lx = x[pddm_ext.distributed.shard(torch.arange(P * K))], lx[pddm_ext.distributed.shard(torch.arange(P * K))]
        y, ly = y[pddm_ext.distributed.shard(torch.arange(12))], ly[pddm_ext.distributed.shard(torch.arange(12))]
    else:  # the gathered order: rank 0's rows, then rank 1's
        ox, oy = (torch.cat([torch.arange(r, n, 2) for r in range(2)]) for n in (P * K, 12))
        x, lx, y, ly = x[ox], lx[ox], y[oy], ly[oy]
    loss = loss_fn(x, lx, ref_emb=y, ref_labels=ly)
    return loss.detach(), tuple(loss_fn.last_quadruplets[:4]), torch.autograd.grad(loss, list(loss_fn.parameters()))


def run_torchrun(args, timeout, env=None):
    """Runs torchrun in its own process group; kills the whole group if it outlives `timeout`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    run_torchrun([__file__, str(out_dir)], TIMEOUT_S)
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(len(SLICES))]
    for res in results:
        res["out_dir"] = out_dir
    return results


@pytest.fixture(scope="module")
def single():
    data, labels, backbone, loss_fn = build(distributed=False)
    return one_step(backbone, loss_fn, data, labels)


def test_all_gather_concatenates_in_rank_order_and_keeps_the_local_graph(ranks):
    data = build(False)[0]
    for r, res in enumerate(ranks):
        assert torch.equal(res["gathered"], data)
        # d/dx sum(gathered^2) = 2x for the local rows only (the other slices are constants).
        start = sum(SLICES[:r])
        torch.testing.assert_close(res["gather_grad"], 2 * data[start:start + SLICES[r]], rtol=0, atol=0)


def test_global_quadruplets_equal_single_process_ones(ranks, single):
    _, quads, _, _ = single
    assert quads[0].numel() == 3
    for res in ranks:
        for got, want in zip(res["step"][1], quads):
            assert torch.equal(got, want)


def test_loss_gradients_and_step_equal_single_process(ranks, single):
    loss, _, grads, params = single
    for res in ranks:
        r_loss, _, r_grads, r_params = res["step"]
        torch.testing.assert_close(r_loss, loss, rtol=0, atol=1e-12)
        assert len(r_grads) == len(grads) == 2 + 8  # backbone weight, bias; W_u ... b_s
        for g_dist, g in zip(r_grads, grads):  # after DDP's averaging
            torch.testing.assert_close(g_dist, g, rtol=1e-10, atol=1e-12)
        for p_dist, p in zip(r_params, params):
            torch.testing.assert_close(p_dist, p, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads[:2])  # the backbone did get a gradient


def test_pml_distributed_miner_wrapper_mines_the_global_batch(ranks):
    data, labels, backbone, loss_fn = build(False)
    with torch.no_grad():
        emb = backbone(data)
    for r, res in enumerate(ranks):
        order = torch.arange(16).roll(-8 * r)  # this rank's 8 rows first, then the other rank's
        want = pddm_ext.PDDMMiner(unit=loss_fn.unit, k=4)(emb[order], labels[order])
        for got, w in zip(res["pml_wrapper"], want):
            assert torch.equal(got, w)


def test_memory_bank_and_raw_per_rank_gradients(ranks):
    """Without DDP: rank r holds W dL/dx_r for its slice and the full dL/dtheta; with a bank (filled
    with the global batches, identical on every rank) mining matches single-process too."""
    single = memory_steps()
    world = len(SLICES)
    for r, res in enumerate(ranks):
        start = sum(SLICES[:r])
        for step, ((loss, quads, gx, gtheta), (r_loss, r_quads, r_gx, r_gtheta)) in enumerate(zip(single, res["memory"])):
            assert r_quads[0].numel() > 0
            for got, want in zip(r_quads, quads):
                assert torch.equal(got, want), step
            torch.testing.assert_close(r_loss, loss, rtol=0, atol=1e-12)
            torch.testing.assert_close(r_gx, world * gx[start:start + SLICES[r]], rtol=1e-10, atol=1e-12)
            for g_dist, g in zip(r_gtheta, gtheta):
                torch.testing.assert_close(g_dist, g, rtol=1e-10, atol=1e-12)


def test_global_batch_loss_wrapper_with_strided_shards(ranks):
    loss, quads, gx, gtheta = wrapper_step()
    world, half = len(SLICES), P * K // len(SLICES)
    for r, res in enumerate(ranks):
        r_loss, r_quads, r_gx, r_gtheta = res["wrapper"]
        assert quads[0].numel() == 3
        for got, want in zip(r_quads, quads):
            assert torch.equal(got, want)
        torch.testing.assert_close(r_loss, loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(r_gx, world * gx[r * half:(r + 1) * half], rtol=1e-10, atol=1e-12)
        for g_dist, g in zip(r_gtheta, gtheta):
            torch.testing.assert_close(g_dist, g, rtol=1e-10, atol=1e-12)


def test_explicit_references_are_gathered_too(ranks):
    loss, quads, gtheta = ref_step()
    assert quads[0].numel() == 4
    for res in ranks:
        r_loss, r_quads, r_gtheta = res["ref"]
        for got, want in zip(r_quads, quads):
            assert torch.equal(got, want)
        torch.testing.assert_close(r_loss, loss, rtol=0, atol=1e-12)
        for g_dist, g in zip(r_gtheta, gtheta):
            torch.testing.assert_close(g_dist, g, rtol=1e-10, atol=1e-12)


def test_sharded_batch_sampler_splits_every_pk_batch_across_ranks(ranks):
    labels = build(False)[1]
    batches = list(pddm_ext.PKSampler(labels, 3, 4, seed=0))
    for r, res in enumerate(ranks):
        assert res["sharded"] == [b[r::len(SLICES)] for b in batches]
    assert list(pddm_ext.distributed.ShardedBatchSampler(batches)) == batches  # one process: unchanged


def run_files(out):
    """The files of a run folder; rank 0 alone writes them (atomically: no temporary files remain)."""
    return sorted(os.listdir(out))


def test_the_training_app_wraps_network_and_global_batch_loss_in_ddp_and_shards_batches(ranks):
    for res in ranks:
        assert res["app_wrap"] == ["DistributedDataParallel", "DistributedDataParallel", "GlobalBatchLoss",
                                   "ShardedBatchSampler"]


def test_training_loop_in_an_existing_process_group_writes_on_rank_0(ranks):
    out = ranks[0]["out_dir"] / "batch-hard"
    assert run_files(out) == ["checkpoint.pt", "log.jsonl", "recall_at_1.png", "result.json"]
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]


def test_pddm_ext_train_under_torchrun_on_digits(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    log = run_torchrun(["-m", "pddm_ext", "train", "--dataset", "digits", "--epochs", "2", "--batches-per-epoch", "3",
                        "--threads", "1", "--quiet", "--out", str(out)], TIMEOUT_S)
    assert run_files(out) == ["checkpoint.pt", "log.jsonl", "recall_at_1.png", "result.json"]
    # one writer: one log line per epoch, one printed table
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert log.count("raw pixels") == 1, log
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["config"]["loss"] == "pddm"
    assert any(k.startswith("unit.") for k in ckpt["loss"])  # the PDDM unit, saved unwrapped
    assert not any(k.startswith("module.") for k in [*ckpt["model"], *ckpt["loss"]])
    history = json.loads((out / "result.json").read_text())["history"]
    assert all(h["mining"]["tuples"] > 0 and h["loss"] > 0 for h in history)


def test_without_a_process_group_distributed_is_a_no_op():
    data, labels, backbone, loss_fn = build(distributed=True)
    assert not pddm_ext.distributed.is_distributed()
    x = data.clone().requires_grad_(True)
    assert pddm_ext.distributed.all_gather(x) is x
    _, _, _, plain = build(distributed=False)
    torch.testing.assert_close(loss_fn(backbone(data), labels), plain(backbone(data), labels), rtol=0, atol=0)


if __name__ == "__main__":
    worker(sys.argv[1])
