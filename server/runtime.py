"""ONNX Runtime sessions for a bundle's towers, on CUDA when present and asked for.

On CUDA a tower runs through an IO binding whose output buffer is allocated
once on the device (per thread, for the largest batch) instead of at every
run, and an fp32 bundle runs in fp16 by default (:func:`fp16_tower`):
converted when loaded by ONNX Runtime's own float16 converter, inputs and
outputs kept float32, and kept only if it agrees with the fp32 tower on a
probe batch as closely as `tandem export --precision fp16` requires.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bundle.parity import PARITY_THRESHOLD, min_cosine

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
    """One ONNX model (a file, or its bytes): float32/int64 in, float32 [batch, dim] out."""

    def __init__(self, path: Path | bytes, providers: list[str], precision: str = "fp32",
                 intra_op_threads: int = 0, inter_op_threads: int = 1, spinning: bool = True,
                 io_binding: bool | None = None, max_batch: int = 32):
        """spinning: ONNX Runtime's intra-op threads spin-wait for the next run (its default). Off, they sleep:
        a lone run starts ~0.4 ms later, but a busy server keeps the CPU the spinning took.
        io_binding: run through an IO binding with a preallocated output buffer of `max_batch` rows (default: on
        CUDA only; on the CPU it measures the same as a plain run, and the tests use it to check the path)."""
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
        self.session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                            providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        self.provider = self.session.get_providers()[0]
        self.precision = precision
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.dim = self.session.get_outputs()[0].shape[-1]
        # an output width known only after a run (never from tandem export) gets plain runs
        self.io_binding = isinstance(self.dim, int) and (self.device == "cuda" if io_binding is None else io_binding)
        self.max_batch = max_batch
        self._local = threading.local()  # each runner thread its own binding and output buffer

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if not self.io_binding or len(batch) > self.max_batch:
            return self.session.run([self.output], {self.input: batch})[0]
        binding, out = self._binding()
        binding.bind_cpu_input(self.input, batch)  # copied to the device by the run (no copy on the CPU)
        # The first rows of the preallocated buffer: no allocation per run, and no wait for ONNX Runtime's arena
        binding.bind_output(self.output, self.device, 0, np.float32, [len(batch), self.dim], out.data_ptr())
        self.session.run_with_iobinding(binding)
        # copy_outputs_to_cpu gives a new array each run: the caller may keep it while the buffer is reused
        return binding.copy_outputs_to_cpu()[0]

    def _binding(self) -> tuple[ort.IOBinding, ort.OrtValue]:
        local = self._local
        if getattr(local, "binding", None) is None:
            local.out = ort.OrtValue.ortvalue_from_shape_and_type([self.max_batch, self.dim], np.float32, self.device, 0)
            local.binding = self.session.io_binding()
        return local.binding, local.out


def to_fp16(path: Path) -> bytes:
    """An fp32 ONNX file converted to fp16 by ONNX Runtime's converter (onnxruntime.transformers.float16), its
    inputs and outputs kept float32. Needs the `onnx` package (the `gpu` extra installs it)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load(str(path)), keep_io_types=True).SerializeToString()


def fp16_tower(path: Path, fp32: Tower, probe: np.ndarray, make: Callable[[bytes], Tower],
               threshold: float = PARITY_THRESHOLD["fp16"]) -> tuple[Tower | None, str]:
    """`path` (an fp32 tower) converted to fp16 and opened with `make`, if its outputs on `probe` keep a cosine
    of at least `threshold` with `fp32`'s, row by row; else None. With the reason either way, for the log."""
    try:
        fp16 = make(to_fp16(path))
        cos = min_cosine(fp32(probe), fp16(probe))
    except ImportError as e:
        return None, f"could not be converted to fp16: {e} (pip install onnx; the gpu extra has it)"
    except Exception as e:  # no onnx package, a model over 2 GiB, an op ONNX Runtime has no fp16 kernel for ...
        return None, f"could not be converted to fp16 ({type(e).__name__}: {e})"
    if not cos >= threshold:  # nan too
        return None, f"fp16 agrees with fp32 only to cosine {cos:.6f} on the probe batch (needs {threshold})"
    return fp16, f"runs in fp16 (converted when loaded; cosine {cos:.6f} against fp32 on the probe batch)"
