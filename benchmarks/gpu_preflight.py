"""The preflight of ``benchmarks/gpu_check.sh``: what the machine has, checked in seconds.

    python -m benchmarks.gpu_preflight [--facts-out FILE] [--rehearsal]

Gathers the facts a GPU run depends on: the GPU (name, SM count, compute capability, memory), the
driver and clocks (``nvidia-smi``), torch and the CUDA version it was built with, ``nvcc`` (from
``$CUDA_HOME/bin``, else ``PATH``), the C++ compiler, ``ninja``, ``compute-sanitizer`` and ``ncu``,
the Python packages the peers need and the carried wheels (``$GPU_WHEELS``, default ``.whl``), and
the commit (``$GPU_CHECK_COMMIT``, else ``git``; the copied tree of a remote run may have no
``.git``) with a hash of the sources (``tree_hash``), so that a result can be matched to its code.

Then checks, in this order, and stops at the first failure with exit code 2 and one line
``gpu_check: ...`` (nothing else is printed): no GPU visible to torch; no ``nvcc``; ``nvcc``'s CUDA
major version differs from torch's (the build would fail, or the extension would not load, after
minutes); no C++ compiler; no ``ninja`` on PATH (torch's builder would compile the sources one
after another: about 6.5 minutes); a package of ``REQUIRED_DISTS`` neither installed nor among the
carried wheels (``GPU_CHECK_ALLOW_MISSING_WHEELS=1`` lets the run go on without those peers). On
success: the facts, a few lines, exit code 0.

``--rehearsal`` (the CPU rehearsal of the script) reports the GPU and toolkit checks without
stopping. ``GPU_CHECK_FACTS`` (a JSON object) replaces gathered facts: the tests fake a GPU, a
toolkit or a missing package with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Distributions the benchmark's peers import, with the module each provides: pytorch-metric-learning's
# BatchHardMiner, and what its import needs (pytorch_metric_learning.utils imports numpy, scipy, tqdm).
REQUIRED_DISTS = {"pytorch-metric-learning": "pytorch_metric_learning", "numpy": "numpy", "scipy": "scipy",
                  "tqdm": "tqdm"}

# Dense FLOPs per clock per SM (the spec sheets' peaks divided by SMs x boost clock): FP32 on the CUDA
# cores, FP64 on the CUDA cores, TF32 on the tensor cores. Only architectures whose figures are known
# here; elsewhere the benchmark bounds by the measured torch.mm rate instead.
FLOP_PER_CLOCK_PER_SM = {
    "8.0": {"FP32": 128, "FP64": 64, "TF32": 1024},   # A100: 19.5 / 9.7 / 156 TFLOP/s at 108 SMs x 1.41 GHz
    "9.0": {"FP32": 256, "FP64": 128, "TF32": 2048},  # H100 / H200 SXM: 67 / 34 / 495 TFLOP/s at 132 SMs
}


def peak_rates(capability, sms, clock_mhz):
    """FLOP/s peaks {"FP32", "FP64", "TF32", "3xTF32"} of a GPU at ``clock_mhz`` (its maximum SM clock),
    or {} when the architecture's figures are not known here."""
    per_sm = FLOP_PER_CLOCK_PER_SM.get(str(capability))
    if not per_sm or not sms or not clock_mhz:
        return {}
    rates = {k: v * sms * clock_mhz * 1e6 for k, v in per_sm.items()}
    rates["3xTF32"] = rates["TF32"] / 3  # three TF32 products per float32 product
    return rates


def _run(cmd, timeout=15):
    """(exit code, stdout + stderr) of a command, (None, why) when it cannot run or times out."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return None, "not found"
    except subprocess.TimeoutExpired:
        return None, f"no answer within {timeout} s"
    except OSError as exc:
        return None, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


NVIDIA_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
                     "power.limit", "temperature.gpu", "persistence_mode", "clocks_event_reasons.active")


def nvidia_smi():
    """Driver and clocks of the first GPU from nvidia-smi, or {"error": why}."""
    if not shutil.which("nvidia-smi"):
        return {"error": "nvidia-smi not on PATH"}
    rc, out = _run(["nvidia-smi", "--query-gpu=" + ",".join(NVIDIA_SMI_FIELDS), "--format=csv,noheader,nounits"])
    if rc != 0 or not out:
        # An older driver may not know a field (clocks_event_reasons): ask again without it.
        rc, out = _run(["nvidia-smi", "--query-gpu=" + ",".join(NVIDIA_SMI_FIELDS[:-1]), "--format=csv,noheader,nounits"])
        if rc != 0 or not out:
            return {"error": f"nvidia-smi: {out.splitlines()[0] if out else rc}"}
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    facts = dict(zip(NVIDIA_SMI_FIELDS, values))
    return {k.replace(".", "_"): v for k, v in facts.items()}


def nvcc_facts(env):
    """{"path", "version"} of nvcc ($CUDA_HOME/bin/nvcc first, as torch's builder), or None."""
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    on_path = shutil.which("nvcc", path=env.get("PATH"))
    if on_path:
        candidates.append(on_path)
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if os.access(path, os.X_OK):
            rc, out = _run([path, "--version"])
            match = re.search(r"release (\d+)\.(\d+)", out or "")
            return {"path": path, "version": f"{match.group(1)}.{match.group(2)}" if match else None,
                    "output": (out or "").splitlines()[-1:]}
    return None


def tool_facts(name, version_args=("--version",)):
    path = shutil.which(name)
    if not path:
        return None
    rc, out = _run([path, *version_args], timeout=10)
    first = next((line for line in (out or "").splitlines() if line.strip()), "")
    return {"path": path, "version": first.strip()[:200]}


def installed_version(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def wheel_dist(filename):
    """The normalised distribution name of a wheel file name (PEP 427: name-version-...)."""
    return re.sub(r"[-_.]+", "-", os.path.basename(filename).split("-")[0]).lower()


def tree_hash(root=REPO_ROOT):
    """sha256 (12 hex digits) over the sources that make the measured code: csrc/ and pddm_ext/ (no
    build outputs), path and content. Computed the same way anywhere, with or without .git."""
    digest = hashlib.sha256()
    for top in ("csrc", "pddm_ext", "setup.py"):
        base = os.path.join(root, top)
        paths = [base] if os.path.isfile(base) else sorted(
            os.path.join(d, f) for d, dirs, files in os.walk(base) for f in files
            if f.endswith((".py", ".cpp", ".h", ".cu", ".cuh")) and "__pycache__" not in d)
        for path in sorted(paths):
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]


def commit_facts(env):
    facts = {"tree_hash": tree_hash()}
    if env.get("GPU_CHECK_COMMIT"):
        facts["commit"] = env["GPU_CHECK_COMMIT"]
        return facts
    rc, out = _run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], timeout=5)
    facts["commit"] = out if rc == 0 else None
    if rc == 0:
        rc, status = _run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"], timeout=10)
        facts["dirty"] = bool(status) if rc == 0 else None
    return facts


def torch_facts():
    import torch

    facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": False, "device_count": 0}
    try:
        facts["cuda_available"] = torch.cuda.is_available()
        facts["device_count"] = torch.cuda.device_count() if facts["cuda_available"] else 0
    except Exception as exc:  # noqa: BLE001  (a broken driver is a fact too)
        facts["cuda_error"] = f"{type(exc).__name__}: {exc}"
    if facts["device_count"]:
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                     gpu_memory_bytes=props.total_memory)
    return facts


def gather(env=None):
    """Every fact of the module docstring, then the overrides of GPU_CHECK_FACTS."""
    env = dict(os.environ if env is None else env)
    facts = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    facts.update(torch_facts())
    facts["nvidia_smi"] = nvidia_smi()
    facts["nvcc"] = nvcc_facts(env)
    facts["cxx"] = tool_facts(env.get("CXX") or "c++") or tool_facts("g++")
    facts["ninja"] = tool_facts("ninja")
    facts["compute_sanitizer"] = tool_facts("compute-sanitizer")
    facts["ncu"] = tool_facts("ncu")
    facts["installed"] = {dist: installed_version(dist) for dist in REQUIRED_DISTS}
    wheels_dir = env.get("GPU_WHEELS") or ".whl"
    if not os.path.isabs(wheels_dir):
        wheels_dir = os.path.join(REPO_ROOT, wheels_dir)
    facts["wheels_dir"] = wheels_dir
    facts["wheels"] = sorted(f for f in os.listdir(wheels_dir) if f.endswith(".whl")) if os.path.isdir(wheels_dir) else []
    facts.update(commit_facts(env))
    override = env.get("GPU_CHECK_FACTS")
    if override:
        for key, value in json.loads(override).items():
            if isinstance(value, dict) and isinstance(facts.get(key), dict):
                facts[key] = {**facts[key], **value}
            else:
                facts[key] = value
    return facts


def _major(version):
    return str(version).split(".")[0] if version else None


def problems(facts, allow_missing_wheels=False):
    """[(kind, fatal, line)] in the order they are checked, kind "gpu", "toolkit" or "wheels"; the first
    fatal one stops the script."""
    found = []
    if not facts.get("cuda_available") or not facts.get("device_count"):
        build = f"CUDA {facts['torch_cuda']}" if facts.get("torch_cuda") else "a CPU-only build"
        why = facts.get("cuda_error") or (facts.get("nvidia_smi") or {}).get("error") or "no CUDA device visible"
        found.append(("gpu", True, f"no GPU: torch {facts.get('torch')} ({build}) sees no CUDA device ({why})"))
    nvcc = facts.get("nvcc")
    if not nvcc:
        found.append(("toolkit", True, "no nvcc: neither $CUDA_HOME/bin/nvcc nor nvcc on PATH; set CUDA_HOME to the CUDA "
                            f"{facts.get('torch_cuda') or '?'} toolkit"))
    elif facts.get("torch_cuda") and _major(nvcc.get("version")) != _major(facts["torch_cuda"]):
        found.append(("toolkit", True, f"CUDA toolkit {nvcc.get('version')} ({nvcc['path']}) does not match torch's CUDA "
                            f"{facts['torch_cuda']} (major versions differ: the extension would fail to build or "
                            f"load); set CUDA_HOME to a CUDA {_major(facts['torch_cuda'])}.x toolkit"))
    if not facts.get("cxx"):
        found.append(("toolkit", True, "no C++ compiler: neither $CXX, c++ nor g++ on PATH"))
    if not facts.get("ninja"):
        found.append(("toolkit", True, "ninja is not on PATH: torch's builder would compile the sources one after another "
                            "(about 6.5 minutes); put ninja on PATH (pip's ninja package installs one)"))
    carried = {wheel_dist(w) for w in facts.get("wheels", [])}
    for dist in REQUIRED_DISTS:
        if not (facts.get("installed") or {}).get(dist) and dist not in carried:
            found.append(("wheels", not allow_missing_wheels,
                          f"{dist} is neither installed nor among the wheels in {facts.get('wheels_dir')}: run "
                          "`make gpu-wheels` and carry .whl (GPU_CHECK_ALLOW_MISSING_WHEELS=1 runs without "
                          "BatchHardMiner)"))
    return found


def summary(facts):
    """A few lines for the log."""
    smi = facts.get("nvidia_smi") or {}
    nvcc = facts.get("nvcc") or {}
    lines = [
        f"GPU: {facts.get('gpu', 'none')} ({facts.get('sms', '?')} SMs, sm_{str(facts.get('capability', '?')).replace('.', '')}, "
        f"{(facts.get('gpu_memory_bytes') or 0) / 2**30:.0f} GiB); driver {smi.get('driver_version', '?')}; "
        f"SM clock {smi.get('clocks_sm', '?')} of max {smi.get('clocks_max_sm', '?')} MHz, memory clock "
        f"{smi.get('clocks_mem', '?')} MHz; throttle reasons {smi.get('clocks_event_reasons_active', '?')}",
        f"torch {facts.get('torch')} (CUDA {facts.get('torch_cuda')}), nvcc {nvcc.get('version', 'missing')} "
        f"({nvcc.get('path', '-')}), Python {facts.get('python')}, {facts.get('cpu_count')} cores",
        f"c++: {(facts.get('cxx') or {}).get('version', 'missing')}; ninja: {(facts.get('ninja') or {}).get('version', 'missing')}; "
        f"compute-sanitizer: {'yes' if facts.get('compute_sanitizer') else 'no'}; ncu: {'yes' if facts.get('ncu') else 'no'}",
        "packages: " + ", ".join(f"{d} {v or 'missing'}" for d, v in (facts.get("installed") or {}).items())
        + f"; wheels: {', '.join(facts.get('wheels') or []) or 'none'}",
        f"commit {facts.get('commit') or 'unknown (no .git here: pass GPU_CHECK_COMMIT)'}, sources {facts.get('tree_hash')}",
    ]
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts-out", help="write the facts here (JSON)")
    ap.add_argument("--rehearsal", action="store_true", help="report the GPU and toolkit checks, stop on none of them")
    args = ap.parse_args(argv)
    facts = gather()
    allow = os.environ.get("GPU_CHECK_ALLOW_MISSING_WHEELS") == "1"
    found = problems(facts, allow_missing_wheels=allow)
    fatal = [line for kind, is_fatal, line in found if is_fatal and not (args.rehearsal and kind != "wheels")]
    if fatal:
        print(f"gpu_check: {fatal[0]}", flush=True)
        return 2
    for line in summary(facts):
        print(line)
    for _, is_fatal, line in found:
        print(("rehearsal, a real run would stop: " if is_fatal else "warning: ") + line)
    facts["preflight_notes"] = [line for _, _, line in found]
    if args.facts_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.facts_out)), exist_ok=True)
        with open(args.facts_out, "w") as f:
            json.dump(facts, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
