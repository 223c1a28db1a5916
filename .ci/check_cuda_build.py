"""The CUDA build check of CI (`make cuda-build`), run from the root of the tree that was
just built with PDDM_EXT_CUDA=1: the extension must be the CUDA variant and every pddm_ext op must
have a CUDA kernel registered. Needs a CUDA build of torch, not a GPU.
"""

import os
import sys

import torch

# Every op of csrc/pddm_ext.cpp; any other op with a CPU kernel is required to have a CUDA one too.
REQUIRED_OPS = ("scores", "scores_backward", "mine_pddm", "mine_euclidean")


def registered_cpu_ops():
    try:
        names = torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
    except (AttributeError, RuntimeError):
        return set()
    return {name.split("::", 1)[1].split(".", 1)[0] for name in names if name.startswith("pddm_ext::")}


def has_kernel(op, dispatch_key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"pddm_ext::{op}", dispatch_key)
    except RuntimeError:  # no such op
        return False


def main():
    # The tree to check is the working directory (the script's own folder is what Python puts first).
    sys.path.insert(0, os.getcwd())
    import pddm_ext
    from pddm_ext import _C

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {torch.cuda.is_available()}")
    print(f"extension: {_C.__file__}")
    problems = []
    if torch.version.cuda is None:
        problems.append("this torch has no CUDA: install the CUDA build (CUDA_TORCH_SPEC)")
    expected_dir = os.path.join(os.getcwd(), "pddm_ext")
    if os.path.dirname(os.path.abspath(pddm_ext.__file__)) != expected_dir:
        problems.append(f"imported pddm_ext from {pddm_ext.__file__}, not from the tree built here ({expected_dir})")
    if not getattr(_C, "with_cuda", False):
        problems.append("pddm_ext._C was built without CUDA (with_cuda is False): are there sources in csrc/cuda/?")
    ops = sorted(set(REQUIRED_OPS) | registered_cpu_ops())
    for op in ops:
        cpu, cuda = has_kernel(op, "CPU"), has_kernel(op, "CUDA")
        print(f"  pddm_ext::{op:<20} CPU kernel: {'yes' if cpu else 'NO'}   CUDA kernel: {'yes' if cuda else 'NO'}")
        if not cuda:
            problems.append(f"pddm_ext::{op} has no CUDA kernel registered")
    if problems:
        print("CUDA build check FAILED:", *problems, sep="\n  - ", file=sys.stderr)
        return 1
    print(f"CUDA build check passed: {len(ops)} ops have CUDA kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
