"""Two CUDA-emulation builds side by side (docs/emulation.md): the same small workloads timed in
alternating fresh processes, each started in its build's directory so that its ``pddm_ext`` is imported.

    python benchmarks/results/emulation_speed/compare_emulation.py before=/tmp/before-emu \
        after=/tmp/ci-clone/build/emu-tree --rounds 3 > benchmarks/results/emulation_speed/result.json

Workloads (float32, d = h = c = 32, PDDM_EMU_ORDER=forward): scores forward + backward at m = 96
(batch mode), mine_hard k = 8 at m = 96, and scores forward of float16 inputs at m = 96 (the half path).
Each process times every workload 3 times after one warm-up call and reports the median (seconds).
"""

import json
import os
import statistics
import subprocess
import sys

CHILD = r'''
import json, time, statistics, torch, pddm_ext
assert pddm_ext._C.cuda_emulation, "not an emulation build"
torch.manual_seed(0)
unit = pddm_ext.PDDM(32)
x = torch.randn(96, 32)
labels = torch.randint(0, 8, (96,))
def fwd_bwd():
    xr = x.clone().requires_grad_()
    unit(xr).sum().backward()
work = dict(scores_fwd_bwd=fwd_bwd, mine_hard=lambda: pddm_ext.mine_hard(x, labels, unit, k=8),
            scores_half=lambda: unit(x.half()))
out = {}
for name, f in work.items():
    f()
    times = []
    for _ in range(3):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    out[name] = statistics.median(times)
print(json.dumps(out))
'''


def main(argv):
    rounds = 3
    if "--rounds" in argv:
        i = argv.index("--rounds")
        rounds = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    builds = dict(a.split("=", 1) for a in argv)
    env = dict(os.environ, PDDM_EMU_ORDER="forward", OMP_NUM_THREADS="1", PYTHONPATH="")
    per = {name: [] for name in builds}
    for _ in range(rounds):
        for name, path in builds.items():
            res = subprocess.run([sys.executable, "-c", CHILD], cwd=path, env=env, capture_output=True, text=True,
                                 check=True)
            per[name].append(json.loads(res.stdout))
    summary = {name: {w: statistics.median(r[w] for r in runs) for w in runs[0]} for name, runs in per.items()}
    names = list(builds)
    ratios = {w: summary[names[1]][w] / summary[names[0]][w] for w in summary[names[0]]}
    print(json.dumps(dict(builds=builds, rounds=per, median=summary, ratio_second_over_first=ratios), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
