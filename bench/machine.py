"""What machine a benchmark ran on: CPU model and its bf16 matrix instructions, from /proc/cpuinfo."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_info() -> dict:
    """{"model", "cpuid", "cores", "amx_bf16", "avx512_bf16", "avx512f"}; flags are False where unknown.

    `cpuid` is "family F model M stepping S": virtual machines often hide the marketing name
    ("Intel(R) Xeon(R) Processor") but not these numbers (family 6 model 143 is Sapphire Rapids).
    """
    model, flags, cores, ident = platform.processor() or platform.machine(), set(), 0, {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            model = value.strip()
            cores += 1
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key in ("cpu family", "model", "stepping") and key not in ident:
            ident[key] = value.strip()
    cpuid = " ".join(f"{k} {v}" for k, v in ident.items()).replace("cpu family", "family")
    return {"model": model, "cpuid": cpuid, "cores": cores or None, "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "avx512f": "avx512f" in flags}


def cpu_summary() -> str:
    """One line: model, logical CPUs, and whether AMX-BF16 / AVX512-BF16 are there."""
    c = cpu_info()
    yes = {True: "yes", False: "no"}
    ident = f"{c['cpuid']}, " if c["cpuid"] else ""
    return (f"CPU {c['model']} ({ident}{c['cores']} logical CPUs; AMX-BF16 {yes[c['amx_bf16']]}, "
            f"AVX512-BF16 {yes[c['avx512_bf16']]}, AVX-512F {yes[c['avx512f']]})")
