"""What fine-tuning EfficientNet-Lite0 costs here: seconds per training step (32 images, forward,
backward and Adam) and per evaluated image, one thread, with the ImageNet weights (the pretrained
extra). Run: OMP_NUM_THREADS=1 python benchmarks/results/compare/finetune_step_time.py
(output of the committed run: finetune_step_time.txt beside this file)."""

import time

import torch

from pddm_ext.app import models

torch.set_num_threads(1)
model = models.EfficientNetLiteEmbedder(64, pretrained=True)
opt = torch.optim.Adam(model.parameters(), 1e-3)
for size in (64, 96):
    x = torch.rand(32, 3, size, size)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        loss = model(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    model.eval()
    with torch.no_grad():
        t = time.perf_counter()
        model(torch.rand(256, 3, size, size))
        per_image = (time.perf_counter() - t) / 256
    model.train()
    print(f"{size} px: training step of 32 images {min(times[1:]):.3f} s (best of 3 after one warm-up), "
          f"evaluation {per_image * 1000:.1f} ms per image")
