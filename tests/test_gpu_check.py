"""benchmarks/gpu_check/run.py in its CPU smoke mode (--cpu-smoke), end to end.

The GPU check runs on a borrowed GPU machine with minutes of time and no second try, so here, on the CPU,
every code path runs at tiny sizes with CPU stand-ins (the CPU execution provider, faiss-cpu, a CPU server,
CPU training steps). This is the smoke mode only: it proves the script runs and writes every section, not
any speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("ort", "server", "faiss", "train")


def leaves(node, path=()):  # type: ignore[no-untyped-def]
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, (*path, str(k)))
    else:
        yield path, node


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check/run.py", "--cpu-smoke", "--out", str(out),
                           "--work-dir", str(tmp / "work")], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_cpu_smoke_mode_writes_every_section_without_errors(report: dict) -> None:  # type: ignore[type-arg]
    assert report["schema"] == "tandem-gpu-check/1" and report["mode"] == "cpu-smoke"
    assert report["environment"]["packages"]["onnxruntime"]
    for name in SECTIONS:
        section = report["sections"][name]
        assert section["status"] == "ok", (name, section.get("errors"))
        assert isinstance(section["seconds"], float) and section["seconds"] > 0
        values = list(leaves(section["results"]))
        assert any(isinstance(v, float) for _, v in values), name
        errors = [(p, v) for p, v in values if isinstance(v, str) and v.startswith("error")]
        assert not errors, errors


@pytest.mark.slow
def test_cpu_smoke_mode_measures_each_part_or_says_why_not(report: dict) -> None:  # type: ignore[type-arg]
    ort = report["sections"]["ort"]["results"]
    tower = ort["bundles"]["tandem-shapes"]["image"]
    for mode in ("numpy", "iobinding", "iobinding_h2d"):
        assert tower[mode]["best_items_per_s"] > 0
    assert tower["batch1_latency"]["iobinding"]["p50_ms"] > 0
    assert tower["parity_vs_cpu_ep"]["max_abs_diff"] < 1e-5  # the CPU EP stands in for CUDA: the same numbers
    assert ort["export"].startswith("skipped: --cpu-smoke")

    server = report["sections"]["server"]["results"]["tandem-shapes"]
    for kind in ("image_jpeg", "image_pixels", "text"):
        assert {"c1_n1", "c4_n1", "c1_n4", "c4_n4"} <= set(server[kind])
        assert all(not r["errors"] for k, r in server[kind].items() if k.startswith("c"))
        assert server[kind]["ratio_to_raw_ort"] > 0  # read from section ort of the same run
    assert report["sections"]["server"]["results"]["precisions"]["tandem-shapes"] == "fp32"  # the CPU: as exported
    decode = report["sections"]["server"]["results"]["jpeg_decode"]  # torchvision on the CPU stands in for nvJPEG
    assert decode["taken"] == decode["of"] == 16 and decode["max_diff_8bit_levels"] <= 1.0001

    faiss = report["sections"]["faiss"]["results"]
    flat = faiss["flat"]["2000"]
    for storage in ("fp32", "fp16"):
        assert flat[storage]["batch1024_q_per_s"] > 0
        assert flat[storage]["recall_at_10_vs_cpu_flat"] >= 0.9
    assert faiss["collection"]["recall_at_10_vs_raw"] == 1.0
    assert faiss["matmul_topk"]["2000"]["recall_at_10_vs_fp32"] == 1.0

    train = report["sections"]["train"]["results"]
    assert {c["image_size"] for c in train["clip"].values()} == {48, 32}
    assert all(c["fraction_of_bare"] > 0 for c in train["clip"].values())
    methods = train["ssl"]["32px"]
    assert {"simclr", "moco_v2", "moco_v3", "byol", "simsiam", "swav", "mae"} <= set(methods)
    assert set(methods["bare"]) == {"resnet-micro", "vit-micro"}  # MAE's ViT has a baseline of its own
    assert all(m["fraction_of_bare"] > 0 for k, m in methods.items() if k != "bare")
