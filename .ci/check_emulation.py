"""Checks of the CUDA emulation build (`make cuda-emulate`, docs/emulation.md), run from the root of
the tree that was just built with PDDM_EXT_CUDA_EMULATION=1.

  --build                 the tree's pddm_ext is the emulation build and every op has its emulated kernel
  --must-fail ORDER...    a self-test: this build has one synchronisation compiled out (the barrier after
                          phase 1b of the forward tile, PDDM_EXT_TEST_DROP_TILE_BARRIER, or the wait for
                          pair_gemm's asynchronous staging copies, PDDM_EXT_TEST_DROP_COPY_WAIT; --dropped
                          names it in the messages); the scores tests of tests/test_scores.py must fail (test
                          failures, not errors) under at least one of the thread orders
"""

import argparse
import os
import subprocess
import sys

OPS = ("scores", "scores_backward", "mine_pddm", "mine_euclidean")
SELF_TEST = "tests/test_scores.py::test_scores_match_reference"


def check_build():
    sys.path.insert(0, os.getcwd())
    import torch

    import pddm_ext
    from pddm_ext import _C

    problems = []
    expected_dir = os.path.join(os.getcwd(), "pddm_ext")
    if os.path.dirname(os.path.abspath(pddm_ext.__file__)) != expected_dir:
        problems.append(f"imported pddm_ext from {pddm_ext.__file__}, not from the tree built here ({expected_dir})")
    if not getattr(_C, "cuda_emulation", False):
        problems.append("pddm_ext._C is not the emulation build (cuda_emulation is not True)")
    for op in OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pddm_ext::{op}", "CPU"):
            problems.append(f"pddm_ext::{op} has no emulated kernel (CPU dispatch key)")
    print(f"extension: {_C.__file__} (CUDA emulation: {getattr(_C, 'cuda_emulation', False)})")
    return problems


def must_fail(orders, dropped):
    problems = check_build()
    if problems:
        return problems
    failed_in = []
    for order in orders:
        env = dict(os.environ, PDDM_EMU_ORDER=order, PYTHONPATH=os.getcwd())
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable", "--tb=no",
               "-x", SELF_TEST]
        print(f"::: self-test, PDDM_EMU_ORDER={order}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.run(cmd, env=env).returncode
        # pytest: 0 all passed, 1 some tests failed; anything else (errors, nothing collected) is no proof.
        if rc == 1:
            failed_in.append(order)
            print(f"::: self-test, PDDM_EMU_ORDER={order}: the scores test FAILS, as it must without {dropped}")
        elif rc == 0:
            print(f"::: self-test, PDDM_EMU_ORDER={order}: the scores test passes without {dropped}")
        else:
            return [f"pytest exited with {rc} under PDDM_EMU_ORDER={order}: an error, not a test failure"]
    if not failed_in:
        return [f"with {dropped} compiled out, the scores test passed under every order: "
                "the emulation cannot show it missing"]
    print(f"emulation self-test passed: the build without {dropped} fails under {', '.join(failed_in)}")
    return []


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--build", action="store_true")
    group.add_argument("--must-fail", nargs="+", metavar="ORDER")
    parser.add_argument("--dropped", default="the barrier after phase 1b of the forward tile",
                        help="what the --must-fail build compiled out (for the messages)")
    args = parser.parse_args()
    problems = check_build() if args.build else must_fail(args.must_fail, args.dropped)
    if problems:
        print("CUDA emulation check FAILED:", *problems, sep="\n  - ", file=sys.stderr)
        return 1
    if args.build:
        print(f"CUDA emulation build check passed: {len(OPS)} ops have emulated kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
