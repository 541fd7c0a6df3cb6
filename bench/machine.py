"""What machine a benchmark ran on: CPU model and its bf16 matrix instructions, from /proc/cpuinfo."""

from __future__ import annotations

from trailers12k_feats.runtime import cpu_identity as cpu_info


def cpu_summary() -> str:
    """One line: model, logical CPUs, and whether AMX-BF16 / AVX512-BF16 are there."""
    c = cpu_info()
    yes = {True: "yes", False: "no"}
    ident = f"{c['cpuid']}, " if c["cpuid"] else ""
    return (f"CPU {c['model']} ({ident}{c['cores']} logical CPUs; AMX-BF16 {yes[c['amx_bf16']]}, "
            f"AVX512-BF16 {yes[c['avx512_bf16']]}, AVX-512F {yes[c['avx512f']]})")
