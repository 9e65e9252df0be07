"""What the figures were measured on, and the machine's measured matrix-multiply peak."""
from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import time

import numpy as np

from posterrt.runtime.cpu_variants import cpu_flags as all_cpu_flags, cpuinfo_value, detect_cpu


def cpu_model() -> str:
    return cpuinfo_value("model name") or platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The flags that decide the speed of these benches' kernels (the runtime reads the same ones
    to pick a bundle's default CPU variants: runtime/cpu_variants.py)."""
    return sorted(f for f in all_cpu_flags() if f.startswith(("avx512", "amx", "avx2", "fma")))


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("numpy", "onnx", "onnxruntime", "torch", "tritonclient", "nvidia-pytriton", "diffusers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def gemm_peak_gflops(size: int = 2048, repeats: int = 5) -> dict:
    """Measured GEMM throughput on this machine: fp32 with numpy, bf16 with torch when installed.
    This is the 'peak' the report compares achieved GFLOP/s with (measured, not a datasheet)."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    peak = {"gemm_size": size, "fp32_gflops": 2 * size ** 3 / best / 1e9}
    try:
        import torch

        ta, tb = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
        ta @ tb
        best = min(_time(lambda: ta @ tb) for _ in range(repeats))
        peak["bf16_gflops_torch"] = 2 * size ** 3 / best / 1e9
    except ImportError:
        pass
    peak["int8_gops_onnxruntime"] = _int8_gemm_gops(a, b, repeats)
    return peak


def _int8_gemm_gops(a: np.ndarray, b: np.ndarray, repeats: int) -> float:
    """uint8 x int8 -> int32 GEMM (``MatMulInteger``) in ONNX Runtime: the kernel family (MLAS, VNNI where
    the CPU has it) the int8 variants' QLinearConv / QLinearMatMul run on, so the ceiling they can reach."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_gemm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape)),
                               helper.make_tensor_value_info("b", TensorProto.INT8, list(b.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [a.shape[0], b.shape[1]])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"a": np.clip(a * 40 + 128, 0, 255).astype(np.uint8), "b": np.clip(b * 40, -127, 127).astype(np.int8)}
    session.run(None, feeds)
    best = min(_time(lambda: session.run(None, feeds)) for _ in range(repeats))
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9


def _time(fn) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def describe(measure_peak: bool = True) -> dict:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(), "cpu_kind": detect_cpu().name,
            "platform": platform.platform(), "libraries": library_versions()}
    if measure_peak:
        info["peak"] = gemm_peak_gflops()
    return info
