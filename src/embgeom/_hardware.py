"""What this machine computes fast: the CPU's name, whether it multiplies bfloat16
in hardware, and the rule that picks a precision by measurement.

The rule, for every product whose precision embgeom chooses on its own: among the
exact paths the hardware runs natively, time one representative piece of work of
each (once per process and shape, a few milliseconds) and take the fastest. A
precision the hardware only emulates (bfloat16 without AVX512-BF16 / AMX on x86,
without the BF16 extension on ARM, or any GPU that lacks it) is never a default,
whatever its timing.
"""
from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager

__all__ = ["cpu_name", "bf16_native", "pick_fastest", "best_time", "ieee_fp32_matmul"]


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _cpu_field(names) -> str:
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in names:
            return value.strip()
    return ""


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    return _cpu_field(("model name", "cpu model", "hardware")) or platform.processor() or platform.machine()


def bf16_native(device=None) -> bool:
    """Whether bfloat16 products run in hardware here: on x86 CPUs AVX512-BF16 or
    AMX-BF16, on ARM CPUs the BF16 extension; on CUDA devices of compute
    capability ≥ 8.0. Unknown means emulated."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.get_device_capability(device)[0] >= 8
    flags = set(_cpu_field(("flags", "features")).split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) and _isa_limit_keeps_bf16()


def _isa_limit_keeps_bf16() -> bool:
    """False where oneDNN, which runs torch's bfloat16 products on x86 CPUs, is told
    to stop below the bf16 instructions (``ONEDNN_MAX_CPU_ISA=AVX2`` and the like):
    its bf16 products are then emulated, whatever the CPU has."""
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return isa in ("", "ALL", "DEFAULT") or any(part in isa for part in ("BF16", "AMX", "FP16", "AVX10"))


def pick_fastest(timings: dict, emulated=()) -> str:
    """The path with the smallest timing among those not in `emulated`; ties go to
    the first listed. `timings`: {path: seconds} (NaN or None = not measurable)."""
    best = None
    for path, t in timings.items():
        if path in emulated or t is None or not (t == t):
            continue
        if best is None or t < timings[best]:
            best = path
    if best is None:
        raise ValueError(f"no measurable native path among {sorted(timings)}")
    return best


def best_time(fn, repeat: int = 3, sync=None) -> float:
    """Best wall time of ``fn()`` over `repeat` runs after one warm-up run."""
    fn()
    if sync is not None:
        sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        best = min(best, time.perf_counter() - t)
    return best


@contextmanager
def ieee_fp32_matmul():
    """Force IEEE float32 matrix products (no TF32 / bf16 shortcuts) inside the block
    (exact float32 is what the k-NN bounds and the float32 Gram are written for)."""
    import torch

    restore = []
    for backend in ("mkldnn", "cuda"):
        mod = getattr(getattr(torch.backends, backend, None), "matmul", None)
        if mod is not None and hasattr(mod, "fp32_precision"):
            try:
                old = mod.fp32_precision
                if old not in ("ieee",):
                    mod.fp32_precision = "ieee"
                    restore.append((mod, "fp32_precision", old))
            except Exception:  # pragma: no cover - backend-specific
                pass
    cuda_mm = getattr(getattr(torch.backends, "cuda", None), "matmul", None)
    if cuda_mm is not None and not hasattr(cuda_mm, "fp32_precision"):  # older torch
        try:
            if cuda_mm.allow_tf32:
                cuda_mm.allow_tf32 = False
                restore.append((cuda_mm, "allow_tf32", True))
        except Exception:  # pragma: no cover
            pass
        try:
            old = torch.get_float32_matmul_precision()
            if old != "highest":
                torch.set_float32_matmul_precision("highest")
                restore.append((None, "legacy", old))
        except Exception:  # pragma: no cover
            pass
    try:
        yield
    finally:
        for mod, attr, old in reversed(restore):
            try:
                if mod is None:
                    torch.set_float32_matmul_precision(old)
                else:
                    setattr(mod, attr, old)
            except Exception:  # pragma: no cover
                pass
