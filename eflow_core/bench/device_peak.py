"""Peak dense bf16/fp16 tensor throughput of known GPUs, for model FLOPs utilization (MFU).

MFU = model FLOPs per second / peak. The peaks are the vendors' dense (no 2:4 sparsity) bf16 tensor-core
numbers in TF/s; a device name matches an entry when it contains every word of the entry's pattern
(case-insensitive), first match wins, so the PCIe and NVL variants come before the plain name.
CPUs, unknown GPUs and fp32 runs have no peak here (MFU None).
"""

from __future__ import annotations

import torch

# (words the torch.cuda.get_device_name() string contains, dense bf16 TF/s)
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10G", 70.0),
)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense tensor peak (TF/s) of a device by its name for bf16/fp16 math; None if unknown or fp32."""
    if dtype not in LOW_PRECISION:
        return None
    name = device_name.lower()
    for pattern, peak in PEAK_BF16_TFLOPS:
        if all(word.lower() in name for word in pattern.split()):
            return peak
    return None


def mfu(flops: float | None, seconds: float | None, peak: float | None) -> float | None:
    """flops / seconds / (peak * 1e12), a fraction in [0, 1]; None when any input is missing."""
    if not flops or not seconds or not peak:
        return None
    return flops / seconds / (peak * 1e12)


def device_name(device: torch.device) -> str:
    """torch's name of a CUDA device ("NVIDIA H100 80GB HBM3"); "cpu" otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
