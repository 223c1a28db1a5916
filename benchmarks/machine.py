"""The machine description stored with every result (CPU model, cores, memory, load, GPU), and the
CPU's FMA-peak estimate that rates are compared with."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpuinfo_fields():
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            block = f.read().split("\n\n")[0]
    except OSError:
        return {}
    fields = {}
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _lscpu_max_mhz():
    """lscpu's "CPU max MHz" (None where lscpu is missing or does not report it, e.g. in many VMs)."""
    if not shutil.which("lscpu"):
        return None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^CPU max MHz:\s*([\d.]+)", out, re.MULTILINE)
    return float(match.group(1)) if match else None


# FMA pipes per core and their width, by micro-architecture (from the vendors' optimisation guides:
# AMD's Software Optimization Guides for family 17h, 19h and 1Ah, Intel's Optimization Reference
# Manual). (vendor, family, first model, last model) -> (name, FMA units, datapath bits). An AVX-512
# FMA on a 256-bit datapath (Zen 4) occupies both pipes: per core it does the work of two 256-bit FMAs.
MICROARCHITECTURES = [
    ("AuthenticAMD", 23, 0x00, 0x2F, "Zen / Zen+", 2, 128),
    ("AuthenticAMD", 23, 0x30, 0xFF, "Zen 2", 2, 256),
    ("AuthenticAMD", 25, 0x00, 0x0F, "Zen 3", 2, 256),
    ("AuthenticAMD", 25, 0x10, 0x1F, "Zen 4", 2, 256),
    ("AuthenticAMD", 25, 0x20, 0x5F, "Zen 3", 2, 256),
    ("AuthenticAMD", 25, 0x60, 0xAF, "Zen 4", 2, 256),
    ("AuthenticAMD", 26, 0x00, 0xFF, "Zen 5 (512-bit datapaths; the mobile parts have 256-bit ones)", 2, 512),
    ("GenuineIntel", 6, 0x3C, 0x3C, "Haswell", 2, 256),
    ("GenuineIntel", 6, 0x3F, 0x3F, "Haswell", 2, 256),
    ("GenuineIntel", 6, 0x45, 0x46, "Haswell", 2, 256),
    ("GenuineIntel", 6, 0x3D, 0x3D, "Broadwell", 2, 256),
    ("GenuineIntel", 6, 0x47, 0x47, "Broadwell", 2, 256),
    ("GenuineIntel", 6, 0x4E, 0x4E, "Skylake (client)", 2, 256),
    ("GenuineIntel", 6, 0x5E, 0x5E, "Skylake (client)", 2, 256),
    ("GenuineIntel", 6, 0x8E, 0x8E, "Kaby/Coffee/Comet Lake", 2, 256),
    ("GenuineIntel", 6, 0x9E, 0x9E, "Kaby/Coffee Lake", 2, 256),
]

# fp32 lanes of one instruction at each dispatch level of the CPU kernels.
ISA_LANES = {"baseline": 4, "avx2": 8, "avx512": 16}


def cpu_facts():
    """Vendor, family, model, the micro-architecture and its FMA units, and the clock, each with its source."""
    info = _cpuinfo_fields()
    facts = {"vendor": info.get("vendor_id"), "source": "/proc/cpuinfo"}
    for key, name in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping")):
        try:
            facts[name] = int(info[key])
        except (KeyError, ValueError):
            facts[name] = None
    flags = set(info.get("flags", "").split())
    facts["flags"] = sorted(flags & {"sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"})
    for vendor, family, first, last, name, units, bits in MICROARCHITECTURES:
        if facts["vendor"] == vendor and facts["family"] == family and facts["model"] is not None and first <= facts["model"] <= last:
            facts.update(microarchitecture=name, fma_units=units, fma_datapath_bits=bits,
                         fma_source="the vendor's optimisation guide (table in benchmarks/machine.py)")
            break
    max_mhz = _lscpu_max_mhz()
    if max_mhz:
        facts.update(clock_mhz=max_mhz, clock_source="lscpu CPU max MHz")
    elif info.get("cpu MHz"):
        facts.update(clock_mhz=float(info["cpu MHz"]),
                     clock_source="/proc/cpuinfo cpu MHz (lscpu reports no max MHz: the current or nominal clock; boost may be higher)")
    return facts


def fma_peak(cpu, isa, cores):
    """{"gflops", "formula"}: cores x FMA units x fp32 lanes per unit x 2 x clock for the dispatch level
    ``isa`` (baseline has no FMA instruction: its multiply and add then count as one FMA's two
    FLOPs, an upper bound); None where the micro-architecture, the clock or the level is unknown."""
    if not (cpu and cpu.get("fma_units") and cpu.get("clock_mhz") and isa in ISA_LANES and cores):
        return None
    lanes = min(ISA_LANES[isa], cpu["fma_datapath_bits"] // 32)
    gflops = cores * cpu["fma_units"] * lanes * 2 * cpu["clock_mhz"] / 1000
    return {"gflops": gflops,
            "formula": f"{cores} cores x {cpu['fma_units']} FMA units x {lanes} fp32 lanes x 2 x {cpu['clock_mhz'] / 1000:.2f} GHz"}


def _mem_total_bytes():
    try:
        with open("/proc/meminfo") as f:
            match = re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def describe():
    """Facts the parent can read without importing torch (the GEMM child adds torch's)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu": cpu_facts(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "ram_bytes": _mem_total_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": load_average(),
    }


def one_line(machine):
    """'AMD EPYC (family 25 model 17, Zen 4), 2 cores, 23.4 GiB RAM, torch 2.13.0+cpu (2 threads), kernels at avx2
    (forced by PDDM_EXT_CPU_ISA)' (+ GPU when present)."""
    cpu = machine.get("cpu") or {}
    model = machine.get("cpu_model", "?")
    if cpu.get("family") is not None:
        model += f" (family {cpu['family']} model {cpu['model']}" + (f", {cpu['microarchitecture']}" if cpu.get("microarchitecture") else "") + ")"
    parts = [model, f"{machine.get('usable_cores', '?')} cores"]
    if machine.get("ram_bytes"):
        parts.append(f"{machine['ram_bytes'] / 2**30:.1f} GiB RAM")
    torch_facts = machine.get("torch_facts", {})
    if torch_facts:
        parts.append(f"torch {torch_facts.get('torch')} ({torch_facts.get('threads')} threads)")
    if torch_facts.get("cpu_isa"):
        parts.append(f"kernels at {torch_facts['cpu_isa']}" + (f" (forced by PDDM_EXT_CPU_ISA; the CPU has {', '.join(torch_facts['cpu_isa_levels'])})"
                                                             if torch_facts.get("cpu_isa_forced") else ""))
    if torch_facts.get("gpu"):
        parts.append(f"GPU {torch_facts['gpu']} ({torch_facts['gpu_memory_bytes'] / 2**30:.0f} GiB, CUDA {torch_facts.get('cuda')})")
    return ", ".join(parts)
