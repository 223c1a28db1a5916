"""benchmarks/precision.py runs (on the CPU kernels here: every precision computes FP32 there, so the
rows agree exactly); on a GPU or the emulation build `make gpu-check` / `make precision-emulated` run it."""

import json

import pddm_ext

from benchmarks import precision


def test_precision_script_writes_every_row(tmp_path):
    assert precision.main(["--device", "cpu", "--m", "12", "--n", "9", "--dim", "8", "--classes", "3", "--seeds", "1",
                           "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "precision.json").read_text())
    assert list(data["rows"]) == ["highest", "high", "medium", "float16", "bfloat16"]
    for name, row in data["rows"].items():
        assert set(row) == {"scores_batch", "scores_bank", "gradients", "sensitivity", "mining"}
        if name in precision.PRECISIONS:
            assert row["scores_batch"][0] < 1e-5 and row["gradients"][0] < 1e-4
        else:  # dL/dx comes back in the half dtype: one rounding of it
            assert row["gradients"][0] < 1e-4 + 2 * precision.PERTURBATION[name]
    cpu = not getattr(pddm_ext._C, "cuda_emulation", False) and not pddm_ext._C.with_cuda
    if cpu:
        measured = ("scores_batch", "scores_bank", "gradients", "mining")  # the CPU kernels ignore the setting
        assert [data["rows"]["highest"][k] for k in measured] == [data["rows"]["medium"][k] for k in measured]
        assert data["rows"]["medium"]["sensitivity"] > data["rows"]["highest"]["sensitivity"]
        for name in precision.HALF_ROWS:  # half inputs computed in float32 on the CPU
            assert data["rows"][name]["scores_batch"][0] < 1e-5 and data["rows"][name]["scores_bank"][0] < 1e-5
    text = (tmp_path / "precision.md").read_text()
    assert text.startswith("Command: `python benchmarks/precision.py --device cpu --m 12")
    assert "| medium |" in text and "| bfloat16 |" in text
