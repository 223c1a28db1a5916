"""`make cuda-resources`: the ptxas figures of every kernel in csrc/cuda/ for one architecture.

Compiles each csrc/cuda/*.cu with `nvcc -Xptxas -v` (no GPU needed; the torch headers of the given
Python environment) and prints, per kernel: registers, spill stores/loads, stack frame, static
shared memory, and the dynamic shared memory its launcher asks for (from the plan's formulas in
csrc/cuda/pddm_tile.cuh: ptxas cannot know it). A change that adds spills or registers shows in the
diff of the committed output (benchmarks/results/cuda_resources.txt).

    python .ci/cuda_resources.py --nvcc /usr/local/cuda-13.0/bin/nvcc --arch sm_90 > benchmarks/results/cuda_resources.txt
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import sysconfig
import tempfile

# Dynamic shared memory each launcher requests (plan_launch): the pair_gemm staging
# (kChunk x (kPairs + V) + kChunk x (kOutBlock + V) elements, V = 16 / T: smem_layout.h) plus, when it
# fits in the block's budget, the tile workspace, whose rows are padded to ws(n) = round_up(n, 32) + 8
# elements; T is the element size in bytes. A second staging buffer (x2: pair_gemm double-buffered) is
# added where it fits next to the same workspace placement without fewer resident blocks per SM.
DYNAMIC = {
    "scores_kernel": "staging {s} B (x2 where it fits) + workspace 64*ws(2h)*{t} B when it fits (else global scratch)",
    "scores_backward_kernel": "staging {s} B (x2 where it fits) + workspace 64*(2ws(2h)+ws(c)+ws(d))*{t} B "
                              "when it fits (else global scratch)",
    "mine_pddm_kernel": "staging {s} B (x2 where it fits) + workspace 64*ws(2h)*{t} B when it fits (else global scratch)",
    "mine_euclidean_kernel": "none",
    "decode_keys_kernel": "none",
    "gemm_kernel": "none",
}


def staging_bytes(t):
    v = 16 // t
    return (16 * (64 + v) + 16 * (128 + v)) * t


def kernel_key(demangled):
    name = demangled.replace("(anonymous namespace)::", "").split("(")[0]
    base = re.sub(r"<.*", "", name).split("::")[-1]
    dtype = "double" if "<double>" in name else ("float" if "<float>" in name else "")
    return base, dtype


def cuda_config_shim(torch_includes, tmp):
    """A CPU build of torch ships the c10/cuda headers but not the header its CMake generates for
    them (c10/cuda/impl/cuda_cmake_macros.h, one define for a shared-library build): supply it."""
    rel = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if any(os.path.exists(os.path.join(p, rel)) for p in torch_includes):
        return []
    os.makedirs(os.path.join(tmp, os.path.dirname(rel)))
    with open(os.path.join(tmp, rel), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [tmp]


def run(nvcc, arch, python_include, torch_includes, source):
    cmd = [nvcc, f"-arch={arch}", "-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DPDDM_EXT_WITH_CUDA",
           "-Xptxas", "-v", "-c", source, "-o", os.devnull, f"-I{python_include}"]
    cmd += [f"-I{p}" for p in torch_includes]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"nvcc failed on {source}")
    for line in res.stderr.splitlines():  # compiler warnings go to the terminal, not into the figures
        if "warning" in line.lower():
            print(line, file=sys.stderr)
    return res.stderr


def parse(log, cufilt):
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if m:
            current = m.group(1)
            kernels[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            kernels[current]["smem"] = int(sm.group(1)) if sm else 0
    names = list(kernels)
    demangled = subprocess.run([cufilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return [(d, kernels[n]) for n, d in zip(names, demangled)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nvcc", required=True)
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()
    from torch.utils import cpp_extension

    cufilt = os.path.join(os.path.dirname(args.nvcc), "cu++filt")
    if not os.path.exists(cufilt):
        cufilt = "c++filt"  # the host demangler reads the same (Itanium) names
    python_include = sysconfig.get_paths()["include"]
    version = subprocess.run([args.nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"# ptxas -v of csrc/cuda/*.cu for {args.arch} ({version}); `make cuda-resources` writes this file.")
    print("# regs: registers per thread; spill: bytes of spill stores/loads; stack: stack frame bytes;")
    print("# static smem: __shared__ bytes (ptxas); dynamic smem: what the launcher requests (T = element bytes;")
    print("# ws(n) = round_up(n, 32) + 8, a workspace row padded as in csrc/cuda/smem_layout.h).")
    header = f"{'kernel':<32} {'dtype':<7} {'regs':>5} {'spill st/ld':>12} {'stack':>6} {'static smem':>12}  dynamic smem"
    tmp = tempfile.mkdtemp(prefix="pddm_ptxas_")
    includes = cpp_extension.include_paths() + cuda_config_shim(cpp_extension.include_paths(), tmp)
    for source in sorted(glob.glob("csrc/cuda/*.cu")):
        rows = parse(run(args.nvcc, args.arch, python_include, includes, source), cufilt)
        print(f"\n## {source}\n{header}")
        for demangled, k in sorted(rows, key=lambda r: kernel_key(r[0])):
            base, dtype = kernel_key(demangled)
            t = 8 if dtype == "double" else 4
            dyn = DYNAMIC.get(base, "?").format(s=staging_bytes(t), t=t)
            spill = f"{k.get('spill_st', 0)}/{k.get('spill_ld', 0)}"
            print(f"{base:<32} {dtype or '-':<7} {k.get('regs', 0):>5} {spill:>12} {k.get('stack', 0):>6} "
                  f"{k.get('smem', 0):>12}  {dyn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
