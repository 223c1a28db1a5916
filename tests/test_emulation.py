"""The CUDA emulation itself (docs/emulation.md), in the emulation build only (``make cuda-emulate`` runs this
file under each thread order): the build registers the emulated kernels for CPU tensors, the selected
thread order, shared memory that starts as NaN, deadlocks reported with the kernel's name, the launch
limits of the emulated H200, warp shuffles and atomics, the models of the TF32 and 16-bit WMMA products
and of the asynchronous copies. Elsewhere these tests skip.
"""

from __future__ import annotations

import os

import pytest
import torch

import pddm_ext
from helpers import HALF, HALF_U, needs_emulation

OPS = ("scores", "scores_backward", "mine_pddm", "mine_euclidean")


@needs_emulation
def test_emulation_build_registers_the_cuda_kernels_for_cpu_tensors():
    assert not pddm_ext._C.with_cuda
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pddm_ext::{op}", "CPU"), op


def emu_order():
    return os.environ.get("PDDM_EMU_ORDER", "random")


@needs_emulation
def test_emulation_thread_order_is_the_selected_one():
    order = torch.ops.pddm_emu_test.thread_order(64)
    assert sorted(order.tolist()) == list(range(64))
    forward, reverse = list(range(64)), list(range(63, -1, -1))
    if emu_order() == "forward":
        assert order.tolist() == forward
    elif emu_order() == "reverse":
        assert order.tolist() == reverse
    else:
        assert order.tolist() not in (forward, reverse)
        assert not torch.equal(order, torch.ops.pddm_emu_test.thread_order(64))  # reshuffled per launch


@needs_emulation
def test_emulation_shared_memory_starts_as_nan():
    out = torch.ops.pddm_emu_test.unwritten_shared(96)
    assert bool(out.isnan().all())


@needs_emulation
@pytest.mark.parametrize("mode,what", [(0, "__syncthreads"), (1, "warp barrier"), (2, "__nanosleep")])
def test_emulation_reports_a_deadlock_with_the_kernel_name(mode, what):
    with pytest.raises(RuntimeError, match=f"deadlock in kernel 'divergent_barrier_kernel'.*{what}"):
        torch.ops.pddm_emu_test.divergent_barrier(mode)
    assert torch.ops.pddm_emu_test.launch_count(1, 1, 32, 0, -1) == 32  # the next launch is unaffected


@needs_emulation
def test_emulation_launch_limits_of_the_h200():
    count = torch.ops.pddm_emu_test.launch_count
    assert count(3, 2, 1024, 48 * 1024, -1) == 6 * 1024
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        count(1, 1, 1025, 0, -1)  # more than 1024 threads per block
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        count(1, 65536, 32, 0, -1)  # grid y above 65535
    with pytest.raises(RuntimeError, match="MaxDynamicSharedMemorySize"):
        count(1, 1, 32, 48 * 1024 + 16, -1)  # above 48 KB without opting in
    assert count(1, 1, 32, 200 * 1024, 200 * 1024) == 32  # opted in
    assert count(1, 1, 32, 227 * 1024, 227 * 1024) == 32  # the opt-in maximum
    with pytest.raises(RuntimeError, match="invalid argument"):
        count(1, 1, 32, 200 * 1024, 100 * 1024)  # above the size it opted in to
    with pytest.raises(RuntimeError, match="invalid argument"):
        count(1, 1, 32, 0, 227 * 1024 + 1)  # cudaFuncSetAttribute above the device's maximum


@needs_emulation
def test_emulation_warp_shuffle_and_atomics():
    sums = torch.ops.pddm_emu_test.warp_sums(96)
    assert sums.tolist() == [528.0] * 96  # 1 + 2 + ... + 32 in every lane
    with pytest.raises(RuntimeError, match="partial warp"):
        torch.ops.pddm_emu_test.warp_sums(80)  # a full-mask shuffle in a 16-lane warp: undefined on a GPU
    blocks, threads = 3, 96
    total = blocks * threads
    got = torch.ops.pddm_emu_test.atomics(blocks, threads).tolist()
    assert got == [0.5 * total, 0.25 * total, total, total, 1000, 1000 + total - 1, total, 7]


def tf32_round(t):
    """float32 -> TF32 (10 explicit mantissa bits), to nearest with ties away from zero (cvt.rna.tf32.f32)."""
    bits = t.contiguous().view(torch.int32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(finite, rounded, t)


@needs_emulation
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_emulation_wmma_half_product(dtype):
    """The emulated 16-bit WMMA as HalfTensorCoreBlock drives it: operands rounded to the half type to
    nearest even (round_operand), exact products, one rounding toward zero to float32; a misaligned
    fragment pointer is refused."""
    torch.manual_seed(0)
    a = torch.randn(16, 16)
    b = torch.randn(16, 16)
    u = HALF_U[dtype]
    a[0, 0] = 1 + u  # a tie: to even, 1
    a[0, 1] = 1 + 3 * u  # a tie: to even, 1 + 4u
    b[0, 0] = 1 + 2 * u  # representable
    out = torch.ops.pddm_emu_test.wmma_half(a, b, dtype, 0)
    ah, bh = a.to(dtype), b.to(dtype)
    assert ah[0, 0] == 1 and ah[0, 1] == 1 + 4 * u and bh[0, 0] == 1 + 2 * u
    exact = ah.double() @ bh.double()  # exact: 16 products of 11- or 8-bit significands
    want = exact.float()
    want = torch.where(want.double().abs() > exact.abs(), torch.nextafter(want, torch.zeros_like(want)), want)
    assert torch.equal(out, want.expand(32, 16, 16))
    assert not torch.equal(want, (a.double() @ b.double()).float())  # the operand rounding is there
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    assert not torch.equal(want, (a.to(other).double() @ b.to(other).double()).float())  # and it is dtype's
    with pytest.raises(RuntimeError, match="256-bit"):
        torch.ops.pddm_emu_test.wmma_half(a, b, dtype, 1)


@needs_emulation
def test_emulation_wmma_tf32_product():
    """The emulated WMMA: TF32-rounded operands, exact products, one rounding toward zero; the stores of every lane
    visible after the warp's barrier; the hardware's requirements enforced."""
    a = torch.randn(16, 8)
    b = torch.randn(8, 16)
    a[0, 0] = 1 + 2**-11  # a tie: rounds away from zero, to 1 + 2**-10
    b[0, 0] = -(1 + 2**-11)
    out = torch.ops.pddm_emu_test.wmma_tf32(a, b, 0)
    assert tf32_round(a)[0, 0] == 1 + 2**-10 and tf32_round(b)[0, 0] == -(1 + 2**-10)
    exact = tf32_round(a).double() @ tf32_round(b).double()  # exact: 8 products of 11-bit significands
    want = exact.float()
    want = torch.where(want.double().abs() > exact.abs(), torch.nextafter(want, torch.zeros_like(want)), want)
    assert torch.equal(out, want.expand(32, 16, 16))  # every lane reads the whole product, rounded toward zero
    assert not torch.equal(want, (a.double() @ b.double()).float())  # the rounding is there
    with pytest.raises(RuntimeError, match="not a TF32 value"):
        torch.ops.pddm_emu_test.wmma_tf32(a, b, 1)  # operands not converted by __float_to_tf32
    assert bool(torch.ops.pddm_emu_test.wmma_tf32(a, b, 2).isnan().any())  # read before the barrier
    with pytest.raises(RuntimeError, match="256-bit"):
        torch.ops.pddm_emu_test.wmma_tf32(a, b, 3)
    with pytest.raises(RuntimeError, match="warp-collective"):
        torch.ops.pddm_emu_test.wmma_tf32(a, b, 4)  # half the warp skips mma_sync


@needs_emulation
def test_emulation_copy_async_lands_at_the_wait():
    """The emulated asynchronous copies (cp.async, copy_async of cuda_compat.cuh): the destination reads NaN from
    the copy's start until the issuing thread's wait, the source's value after it (for other threads after a
    barrier), never without a wait; the hardware's requirements enforced."""
    src = torch.randn(64)
    out = torch.ops.pddm_emu_test.copy_async_model(src, 0)
    assert bool(out[0].isnan().all())  # each thread's own destination, before its wait
    assert torch.equal(out[1], src.roll(-1))  # after the wait and a barrier: the next thread's copy
    assert bool(torch.ops.pddm_emu_test.copy_async_model(src, 1)[1].isnan().all())  # no wait: never lands
    with pytest.raises(RuntimeError, match="aligned"):
        torch.ops.pddm_emu_test.copy_async_model(src, 2)
    with pytest.raises(RuntimeError, match="source is in shared memory"):
        torch.ops.pddm_emu_test.copy_async_model(src, 3)
    with pytest.raises(RuntimeError, match="destination is not in the block's shared memory"):
        torch.ops.pddm_emu_test.copy_async_model(src, 4)
