"""`make cuda-resources` / `make cuda-resources-check`: the static costs of every kernel in csrc/cuda/.

Compiles each csrc/cuda/*.cu once to PTX (`nvcc -ptx -lineinfo`, the torch headers of the given Python
environment; no GPU needed), assembles that PTX with `ptxas -v` for the same architecture, and reports
per kernel: registers, spill stores/loads, stack frame, static shared memory, the dynamic shared memory
its launcher asks for (from the plan's formulas in csrc/cuda/pddm_tile.cuh: ptxas cannot know it), the
resident blocks per SM those figures allow (occupancy(), the rules of the CUDA occupancy calculator for
the architecture), and the 64-bit integer divisions and remainders (`div/rem.{s,u}64`) in its PTX, each
attributed through the line table to the innermost (inlined) function it was compiled from.

--check exits 1 when any kernel has a spill, a stack frame, or a 64-bit division or remainder in a
function outside ALLOWED_DIV64 (the per-tile index decoding, outside every per-pair and per-element
loop); it prints the offending kernels and sites. CI runs it from `make cuda-build`.

    python .ci/cuda_resources.py --nvcc /usr/local/cuda-13.0/bin/nvcc --arch sm_90 > benchmarks/results/cuda_resources.txt
    python .ci/cuda_resources.py --nvcc /usr/local/cuda-13.0/bin/nvcc --arch sm_90 --check
"""

import argparse
import collections
import concurrent.futures
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
# added for the forward and mining kernels where it fits next to the same workspace placement without
# fewer resident blocks per SM; the backward keeps one. Each entry: (text, workspace rows in ws() units as a
# function of (d, h, c)).
DYNAMIC = {
    "scores_kernel": ("staging {s} B (x2 where it fits) + workspace 64*ws(2h)*{t} B when it fits (else global scratch)",
                      lambda d, h, c: ws(2 * h)),
    "scores_backward_kernel": ("staging {s} B + workspace 64*(2ws(2h)+ws(c)+ws(d))*{t} B when it fits (else global scratch)",
                               lambda d, h, c: 2 * ws(2 * h) + ws(c) + ws(d)),
    "mine_pddm_kernel": ("staging {s} B (x2 where it fits) + workspace 64*ws(2h)*{t} B when it fits (else global scratch)",
                         lambda d, h, c: ws(2 * h)),
}

# Functions whose 64-bit divisions are allowed: TileGrid::tile maps a tile number to its tile (once
# per tile of 64, 256 or 1024 pairs, before the tile's per-pair and per-element loops), where the tile
# number of a (m, n) pair space needs 64 bits. Keys are demangled names without parameters.
ALLOWED_DIV64 = {
    "pddm_ext::TileGrid::tile": "tile number -> (tile row, tile column) of a rectangular grid, once per tile",
}

# The shape at which the report evaluates the dynamic shared memory (and so the resident blocks).
REPORT_SHAPE = (128, 128, 128)  # (d, h, c)

# Per-SM limits of the occupancy calculation (CUDA occupancy calculator / CUDA C++ Programming
# Guide, compute capabilities 8.0 and 9.0).
LIMITS = {
    "sm_90": dict(threads=2048, blocks=32, regs=65536, reg_unit=256, sub_partitions=4, smem=233472,
                  smem_reserved=1024, smem_unit=128, max_regs_per_thread=255),
    "sm_80": dict(threads=2048, blocks=32, regs=65536, reg_unit=256, sub_partitions=4, smem=167936,
                  smem_reserved=1024, smem_unit=128, max_regs_per_thread=255),
}
THREADS = 256  # kThreads (csrc/cuda/smem_layout.h): every kernel here runs 256-thread blocks


def ws(n):
    return (n + 31) // 32 * 32 + 8


def staging_bytes(t):
    v = 16 // t
    return (16 * (64 + v) + 16 * (128 + v)) * t


def round_up(x, unit):
    return (x + unit - 1) // unit * unit


def occupancy(limits, regs, threads, smem_bytes):
    """Resident blocks per SM and the resource that limits them.

    blocks = min(blocks/SM, threads/SM // threads, by_regs, by_smem) with
      by_regs = (regs/SM / sub_partitions // round_up(regs * 32, reg_unit)) * sub_partitions // warps
        (a warp's registers are allocated in reg_unit pieces inside one of the SM's sub-partitions),
      by_smem = smem/SM // (round_up(static + dynamic, smem_unit) + smem_reserved)
        (the driver reserves smem_reserved bytes per block)."""
    warps = (threads + 31) // 32
    per_warp = round_up(max(regs, 1) * 32, limits["reg_unit"])
    by_regs = (limits["regs"] // limits["sub_partitions"] // per_warp) * limits["sub_partitions"] // warps
    by_smem = limits["smem"] // (round_up(smem_bytes, limits["smem_unit"]) + limits["smem_reserved"])
    candidates = {"blocks": limits["blocks"], "threads": limits["threads"] // threads, "regs": by_regs,
                  "smem": by_smem}
    blocks = min(candidates.values())
    return blocks, "/".join(k for k, v in candidates.items() if v == blocks)


def kernel_key(demangled):
    name = demangled.replace("(anonymous namespace)::", "").split("(")[0]
    base = re.sub(r"<.*", "", name).split("::")[-1]
    dtype = "double" if "<double" in name else ("float" if "<float" in name else "")
    if re.search(r"<float, true>", name):
        dtype = "half"  # the instantiation for float16 / bfloat16 inputs (kHalf), float32 storage
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


def compile_source(nvcc, arch, includes, extra, source, tmp):
    """(PTX text, ptxas -v log) of one .cu file: one front-end pass to PTX, then ptxas on it."""
    ptx = os.path.join(tmp, os.path.basename(source) + ".ptx")
    cmd = [nvcc, f"-arch={arch}", "-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DPDDM_EXT_WITH_CUDA",
           "-lineinfo", "-ptx", source, "-o", ptx] + [f"-I{p}" for p in includes] + extra
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"nvcc failed on {source}")
    for line in res.stderr.splitlines():  # compiler warnings go to the terminal, not into the figures
        if "warning" in line.lower():
            print(line, file=sys.stderr)
    ptxas = os.path.join(os.path.dirname(nvcc), "ptxas")
    res = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx, "-o", os.devnull], capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"ptxas failed on {source}")
    with open(ptx) as f:
        return f.read(), res.stderr


def parse_ptxas(log):
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
    return kernels


def debug_strings(ptx):
    """$L__info_stringN -> the string (the mangled names of inlined functions in the line table)."""
    strings = {}
    for m in re.finditer(r"^(\$L__info_string\d+):\n((?:\.b8 [\d,]+\n)+)", ptx, re.M):
        data = [int(b) for line in m.group(2).split() if line != ".b8" for b in line.split(",") if b]
        strings[m.group(1)] = bytes(data).split(b"\0")[0].decode()
    return strings


def parse_div64(ptx):
    """{entry: [(instruction, mangled innermost function or None for the kernel body, file:line)]}."""
    files = {m.group(1): os.path.relpath(m.group(2)) for m in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)}
    result, current, depth, where = {}, None, 0, (None, "?")
    for line in ptx.splitlines():
        stripped = line.strip()
        if current is None:
            m = re.match(r"(?:\.visible\s+|\.weak\s+)?\.entry\s+(\S+?)\(?$", stripped)
            if m:
                current, depth, where = m.group(1), 0, (None, "?")
                result[current] = []
            continue
        if stripped == "{":
            depth += 1
        elif stripped == "}":
            depth -= 1
            if depth == 0:
                current = None
        elif stripped.startswith(".loc"):
            m = re.match(r"\.loc\s+(\d+)\s+(\d+)\s+\d+(?:,\s*function_name\s+(\$L__info_string\d+))?", stripped)
            if m and m.group(2) != "0":  # line 0: compiler-generated code, keep the last real location
                where = (m.group(3), f"{files.get(m.group(1), '?')}:{m.group(2)}")
        else:
            m = re.match(r"(?:@%p\d+\s+)?((?:div|rem)\.[su]64)\b", stripped)
            if m:
                result[current].append((m.group(1), where[0], where[1]))
    strings = debug_strings(ptx)
    return {k: [(ins, strings.get(fn) if fn else None, loc) for ins, fn, loc in v] for k, v in result.items()}


def demangle(names, cufilt):
    names = list(names)
    if not names:
        return {}
    out = subprocess.run([cufilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return dict(zip(names, out))


def short_function(demangled):
    """Demangled name without parameters and without the anonymous namespace."""
    name = demangled.replace("(anonymous namespace)::", "")
    depth, end = 0, len(name)
    for i, ch in enumerate(name):  # cut at the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            end = i
            break
    name = re.sub(r"<.*>", "", name[:end]).strip().split(" ")[-1]  # no template arguments, no return type
    return re.sub(r"^_INTERNAL_\w+::", "", name)  # an anonymous namespace as the line table spells it


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nvcc", required=True)
    parser.add_argument("--arch", default="sm_90", choices=sorted(LIMITS))
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a spill, a stack frame or a 64-bit div/rem outside ALLOWED_DIV64")
    args = parser.parse_args()
    from torch.utils import cpp_extension

    cufilt = os.path.join(os.path.dirname(args.nvcc), "cu++filt")
    if not os.path.exists(cufilt):
        cufilt = "c++filt"  # the host demangler reads the same (Itanium) names
    version = subprocess.run([args.nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    tmp = tempfile.mkdtemp(prefix="pddm_ptxas_")
    includes = [sysconfig.get_paths()["include"]] + cpp_extension.include_paths()
    includes += cuda_config_shim(cpp_extension.include_paths(), tmp)
    sources = sorted(glob.glob("csrc/cuda/*.cu"))
    extra = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(sources)) as pool:
        outputs = list(pool.map(lambda s: compile_source(args.nvcc, args.arch, includes, extra, s, tmp), sources))

    limits = LIMITS[args.arch]
    d, h, c = REPORT_SHAPE
    print(f"# csrc/cuda/*.cu for {args.arch} ({version}): `make cuda-resources` writes this file.")
    print("# regs: registers per thread; spill: bytes of spill stores/loads; stack: stack frame bytes (ptxas -v);")
    print("# static smem: __shared__ bytes (ptxas); dynamic smem: what the launcher requests (T = element bytes;")
    print("# ws(n) = round_up(n, 32) + 8, a workspace row padded as in csrc/cuda/smem_layout.h);")
    print(f"# blocks/SM: resident {THREADS}-thread blocks per SM at d = h = c = {h} (workspace in shared memory")
    print("# when it fits), and what limits them: min(32, 2048 // threads, by_regs, by_smem) with by_regs =")
    print(f"# (65536 / 4 // round_up(32 * regs, 256)) * 4 // warps/block (65536 registers in 4 sub-partitions,")
    print(f"# 256-register warp allocations) and by_smem = {limits['smem']} // (round_up(static + dynamic, 128)")
    print(f"# + 1024) ({limits['smem'] // 1024} KiB per SM, 1 KiB reserved per block);")
    print("# div64: div/rem.{s,u}64 instructions in the kernel's PTX (nvcc -ptx), allowed ones in brackets:")
    print("# allowed only in " + ", ".join(ALLOWED_DIV64) + " (the per-tile index decoding).")
    header = (f"{'kernel':<24} {'dtype':<7} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'static smem':>11} "
              f"{'blocks/SM':>16} {'div64':>6}  dynamic smem")
    failures = []
    for source, (ptx, log) in zip(sources, outputs):
        kernels = parse_ptxas(log)
        divs = parse_div64(ptx)
        names = demangle(set(kernels) | {fn for v in divs.values() for _, fn, _ in v if fn}, cufilt)
        rows = sorted(kernels.items(), key=lambda kv: kernel_key(names[kv[0]]))
        print(f"\n## {source}\n{header}")
        for mangled, k in rows:
            base, dtype = kernel_key(names[mangled])
            t = 8 if dtype == "double" else 4
            text, ws_rows = DYNAMIC.get(base, ("none", None))
            dyn = text.format(s=staging_bytes(t), t=t)
            dynamic = 0
            if ws_rows is not None:
                dynamic = staging_bytes(t)
                workspace = 64 * ws_rows(d, h, c) * t
                if k.get("smem", 0) + dynamic + workspace + limits["smem_reserved"] <= limits["smem"]:
                    dynamic += workspace
            blocks, limiter = occupancy(limits, k.get("regs", 0), THREADS, k.get("smem", 0) + dynamic)
            sites = divs.get(mangled, [])
            allowed = [s for s in sites if s[1] and short_function(names[s[1]]) in ALLOWED_DIV64]
            bad = [s for s in sites if s not in allowed]
            spill = f"{k.get('spill_st', 0)}/{k.get('spill_ld', 0)}"
            div_text = f"{len(bad)} [{len(allowed)}]"
            print(f"{base:<24} {dtype or '-':<7} {k.get('regs', 0):>4} {spill:>11} {k.get('stack', 0):>5} "
                  f"{k.get('smem', 0):>11} {f'{blocks} ({limiter})':>16} {div_text:>6}  {dyn}")
            problems = []
            if k.get("spill_st", 0) or k.get("spill_ld", 0):
                problems.append(f"spills {spill} B")
            if k.get("stack", 0):
                problems.append(f"a {k['stack']} B stack frame")
            for (ins, fn, loc), count in collections.Counter(bad).items():
                where = short_function(names[fn]) if fn else "the kernel body"
                problems.append(f"{count} x {ins} in {where} ({loc})")
            if problems:
                failures.append(f"{base}<{dtype or '-'}> ({source}): " + "; ".join(problems))
    if args.check:
        if failures:
            print("\ncuda-resources check FAILED:", file=sys.stderr)
            for f in failures:
                print("  " + f, file=sys.stderr)
            return 1
        print("\ncuda-resources check passed: no spills, no stack frames, no 64-bit div/rem outside "
              + ", ".join(ALLOWED_DIV64), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
