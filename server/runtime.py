"""ONNX Runtime sessions for a bundle's towers, on CUDA when present and asked for."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger("tandem.runtime")


def choose_providers(device: str) -> list[str]:
    """ONNX Runtime execution providers for `device` (auto | cpu | cuda)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(
            "device=cuda but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {available}); install the '.[gpu]' extra or use device=auto"
        )
    return ["CPUExecutionProvider"]


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's CPU limit,
    which os.cpu_count() and ONNX Runtime's default thread count do not see)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


class Tower:
    """One ONNX file: float32/int64 in, float32 [batch, dim] out."""

    def __init__(self, path: Path, providers: list[str], precision: str = "fp32",
                 intra_op_threads: int = 0, inter_op_threads: int = 1, spinning: bool = True):
        """spinning: ONNX Runtime's intra-op threads spin-wait for the next run (its default). Off, they sleep:
        a lone run starts ~0.4 ms later, but a busy server keeps the CPU the spinning took."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if precision == "fp16" and providers[0] == "CPUExecutionProvider":
            # ORT's CPU layout optimisations crash on fp16 transformer graphs (ORT 1.32).
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        self.provider = self.session.get_providers()[0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {self.input: batch})[0]
