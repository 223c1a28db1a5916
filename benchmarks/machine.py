"""The machine description stored with every result (CPU model, cores, memory, load, GPU)."""

from __future__ import annotations

import os
import platform
import re


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "ram_bytes": _mem_total_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": load_average(),
    }


def one_line(machine):
    """'AMD EPYC, 2 cores, 23.4 GiB RAM, torch 2.13.0+cpu (2 threads)' (+ GPU when present)."""
    parts = [machine.get("cpu_model", "?"), f"{machine.get('usable_cores', '?')} cores"]
    if machine.get("ram_bytes"):
        parts.append(f"{machine['ram_bytes'] / 2**30:.1f} GiB RAM")
    torch_facts = machine.get("torch_facts", {})
    if torch_facts:
        parts.append(f"torch {torch_facts.get('torch')} ({torch_facts.get('threads')} threads)")
    if torch_facts.get("gpu"):
        parts.append(f"GPU {torch_facts['gpu']} ({torch_facts['gpu_memory_bytes'] / 2**30:.0f} GiB, CUDA {torch_facts.get('cuda')})")
    return ", ".join(parts)
