"""The calls profiled in benchmarks/README.md ("Where the CPU time goes"): d = h = c = 128, float32.

    python benchmarks/profile/workload.py WORKLOAD [THREADS]

WORKLOAD: scores_fwd (unit(x), m = 1024, twice), mine_k1 (mine_hard k=1, m = 1024, twice), fwd_bwd
(unit(x).sum().backward(), m = 512, twice), batch_hard (Euclidean, N = 8192, three times). THREADS:
torch's intra-op threads (default 1).
"""
import sys, torch, torch.nn.functional as F
import pddm_ext
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
torch.manual_seed(0)
w = sys.argv[1]
if w == "batch_hard":
    x = F.normalize(torch.randn(8192, 128), dim=1); labels = torch.arange(8192) // 4
    for _ in range(3): pddm_ext.batch_hard(x, labels)
    sys.exit()
m = 1024 if w != "fwd_bwd" else 512
x = F.normalize(torch.randn(m, 128), dim=1); labels = torch.arange(m) // 4
unit = pddm_ext.PDDM(128, 128, 128)
for _ in range(2):
    if w == "scores_fwd":
        with torch.no_grad(): unit(x)
    elif w == "mine_k1":
        pddm_ext.mine_hard(x, labels, unit, k=1)
    elif w == "fwd_bwd":
        xr = x.clone().requires_grad_(True); unit(xr).sum().backward()
