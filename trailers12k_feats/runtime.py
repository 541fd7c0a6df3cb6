"""Where and at what precision models run: the device and precision checks every stage shares,
and the choice that `--precision auto` makes (see :func:`resolve_precision`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from trailers12k_feats.utils import T12kError, write_json

log = logging.getLogger(__name__)

# Autocast precisions by name. "fp32" means autocast off; each command allows a subset.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

AUTO = "auto"  # resolved to one of PRECISIONS before any work (resolve_precision)
# On the CPU bf16 is chosen only when its autocast matmuls beat fp32's by this factor: near 1 the
# casts autocast adds eat the gain, and fp32 keeps exact arithmetic.
BF16_MARGIN = 1.10
BUSY_SPREAD = 1.5  # a probe whose median round is this much slower than its best ran beside other work
CACHE_ENV = "T12K_CACHE_DIR"  # where the per-machine probe result is kept (tests point it at tmp dirs)
PROBE_FILE = "precision.json"
# (rows, in, out) of the probe's autocast F.linear: rows = 32 trailers x 30 clips of a training
# batch; the head's Linear F->128, q/k/v 128->384, feed-forward 128->768->128, and a
# backbone-sized 768->768 (Swin's width) that extraction's transformers and 1x1 convs resemble.
PROBE_SHAPES = ((960, 1024, 128), (960, 128, 384), (960, 128, 768), (960, 768, 128), (1024, 768, 768))

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device: str) -> None:
    """Stop unless `device` is "cpu" or "cuda[:N]" and, for CUDA, that device is visible."""
    if not _DEVICE.fullmatch(device):
        raise T12kError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}.")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise T12kError(f"device {device!r} was asked for but CUDA is not available; use --device cpu.")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise T12kError(f"device {device!r} was asked for but only {torch.cuda.device_count()} CUDA "
                            f"device(s) are visible; use --device cuda:0 or another visible index.")


def check_precision(precision: str, device: str, allowed: Sequence[str] = tuple(PRECISIONS)) -> None:
    """Stop unless `precision` is one of `allowed` and can run on `device` (fp16 autocast needs CUDA)."""
    if precision not in allowed or (precision not in PRECISIONS and precision != AUTO):
        raise T12kError(f"unknown precision {precision!r}; valid: {', '.join(allowed)}.")
    if precision == "fp16" and not device.startswith("cuda"):
        raise T12kError("fp16 autocast needs a CUDA device; use --precision bf16 or fp32 on the CPU.")


def autocast(device_type: str, dtype: torch.dtype) -> torch.autocast:
    """Autocast to `dtype` on `device_type` ("cpu" or "cuda"); float32 turns it off."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


# ---------------------------------------------------------------------------- --precision auto

@dataclass(frozen=True)
class PrecisionChoice:
    """What `--precision` asked for (`requested`), what runs (`precision`) and why; `probe` holds
    the CPU probe's figures when one decided it."""

    requested: str
    precision: str
    reason: str
    probe: dict | None = field(default=None, compare=False)

    def record(self) -> dict:
        """The choice as the run's config and the cache's attributes record it."""
        return {"requested": self.requested, "precision": self.precision, "reason": self.reason,
                **({"probe": self.probe} if self.probe else {})}


def cpu_identity() -> dict:
    """{"model", "cpuid", "cores", "amx_bf16", "avx512_bf16", "avx512f"}: the CPU and the bf16
    instructions that decide its speed, from /proc/cpuinfo (flags False where it is not there).

    `cpuid` is "family F model M stepping S": virtual machines often hide the marketing name
    ("Intel(R) Xeon(R) Processor") but not these numbers (family 6 model 143 is Sapphire Rapids).
    """
    model, flags, cores, ident = platform.processor() or platform.machine() or "unknown CPU", set(), 0, {}
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
            flags = set(value.split())  # the first CPU's
        elif key in ("cpu family", "model", "stepping") and key not in ident:
            ident[key] = value.strip()
    cpuid = " ".join(f"{k} {v}" for k, v in ident.items()).replace("cpu family", "family")
    return {"model": model, "cpuid": cpuid, "cores": cores or None, "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "avx512f": "avx512f" in flags}


# Environment variables that cap the instructions torch's CPU kernels use (oneDNN's matmuls, ATen's
# vectorised loops): ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 runs an AMX CPU as one without AMX.
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def probe_key(cpu: dict | None = None, threads: int | None = None) -> str:
    """What a probe result holds for: CPU model, its bf16 flags, torch version, thread count, and any
    instruction cap set in the environment (ISA_ENV)."""
    cpu = cpu or cpu_identity()
    threads = threads or torch.get_num_threads()
    yes = {True: "yes", False: "no"}
    caps = "".join(f"; {name}={os.environ[name]}" for name in ISA_ENV if os.environ.get(name))
    return (f"{cpu['model']}; AMX-BF16 {yes[cpu['amx_bf16']]}, AVX512-BF16 {yes[cpu['avx512_bf16']]}; "
            f"torch {torch.__version__}; {threads} thread{'' if threads == 1 else 's'}{caps}")


def cache_dir() -> Path:
    """$T12K_CACHE_DIR, else $XDG_CACHE_HOME/trailers12k_feats, else ~/.cache/trailers12k_feats."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trailers12k_feats"


def measure_matmul(shapes: Sequence[tuple[int, int, int]] = PROBE_SHAPES, rounds: int = 5) -> dict[str, float]:
    """GFLOP/s of fp32 and of bf16-autocast F.linear over `shapes`, as training and extraction run them.

    fp32 inputs and a weight that requires grad, so bf16 pays autocast's casts as a real run
    does. The two are timed in alternating rounds and each keeps its best, so a burst of other
    work on the machine hits both alike. {"fp32", "bf16", "spread" (the larger median / best
    time of the two: near 1 on a quiet machine), "seconds"}; about 0.1 s on a 2-core CPU.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen).requires_grad_())
             for m, k, n in shapes]  # (m, k) inputs, (n, k) weights
    flops = sum(2 * m * k * n for m, k, n in shapes)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first round warms up (oneDNN builds its kernels on first use)
            for name, seconds in times.items():
                with autocast("cpu", PRECISIONS[name]):
                    t = time.perf_counter()
                    for x, w in pairs:
                        torch.nn.functional.linear(x, w)  # (m, n)
                    seconds.append(time.perf_counter() - t)
    kept = {k: sorted(t[1:]) for k, t in times.items()}
    return {**{k: round(flops / t[0] / 1e9, 1) for k, t in kept.items()},
            "spread": round(max(t[len(t) // 2] / t[0] for t in kept.values()), 2),
            "seconds": round(time.perf_counter() - t0, 3)}


def machine_load() -> tuple[float, int]:
    """(1-minute load average, CPUs this process may use); load 0.0 where the OS does not say."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return load, cpus


def _busy(entry: dict) -> str:
    """Why a probe was taken on a busy machine ("" if it was not): other work then skews the
    figures, so they decide this run only and are not kept."""
    load, cpus = machine_load()
    if load > cpus:
        return f"load average {load:.1f} on {cpus} CPUs"
    if entry.get("spread", 1.0) > BUSY_SPREAD:
        return f"its timings varied {entry['spread']:.1f}x"
    return ""


def _valid_entry(entry: object) -> bool:
    return (isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) and math.isfinite(entry[k])
                                            and entry[k] > 0 for k in ("fp32", "bf16")))


def _read_entries(path: Path) -> dict:
    """The probe results kept in `path`; {} when it is missing, unreadable or not ours (re-measured)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("precision probe cache %s cannot be read (%s); measuring again", path, e)
        return {}
    if not (isinstance(data, dict) and isinstance(data.get("entries"), dict)):
        log.warning("precision probe cache %s is not a probe record; measuring again", path)
        return {}
    return data["entries"]


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` where the OS has flock, so processes started together
    (extraction shards) measure one after the other and the later ones read the first's result;
    where no lock can be taken, go on without one."""
    try:
        import fcntl

        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{PROBE_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
        yield
    finally:
        os.close(fd)


# Probes taken on a busy machine: not kept in the cache file, but reused by this process.
_UNKEPT: dict[str, dict] = {}


def cpu_probe(measure: Callable[[], dict] | None = None) -> dict:
    """fp32 and bf16 GFLOP/s of this machine (`measure`, by default :func:`measure_matmul`), read
    from the per-machine cache when it holds them for this CPU, torch version and thread count,
    else measured now and kept there, unless the machine was busy (:func:`machine_load`, or
    timings spread by more than BUSY_SPREAD): then they serve this process only. A corrupt cache
    is measured again and replaced; one that cannot be written only costs a warning. Returns the
    figures with "key", "cache" (the file), "cached" (read, not measured) and "busy" (why not kept)."""
    folder = cache_dir()
    path = folder / PROBE_FILE
    cpu = cpu_identity()
    key = probe_key(cpu)
    with _lock(folder):
        entries = _read_entries(path)
        entry = entries.get(key)
        cached = _valid_entry(entry)
        if not cached and key in _UNKEPT:
            entry = _UNKEPT[key]
        elif not cached:
            entry = {**(measure or measure_matmul)(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if not _valid_entry(entry):
                raise T12kError(f"the precision probe measured {entry}; pass --precision fp32 or bf16.")
            busy = _busy(entry)
            if busy:
                entry["busy"] = busy
                _UNKEPT[key] = entry
                log.info("the machine was busy during the precision probe (%s): its figures decide this process's "
                         "runs but are not kept in %s", busy, path)
            else:
                try:
                    write_json(path, {"entries": {**entries, key: entry}})
                except OSError as e:
                    log.warning("cannot keep the precision probe in %s (%s); set %s to a writable folder", path, e,
                                CACHE_ENV)
    return {**entry, "cpu": cpu["model"], "key": key, "cache": str(path), "cached": cached}


def cpu_choice(fp32: float, bf16: float, allowed: Sequence[str], margin: float = BF16_MARGIN) -> str:
    """bf16 where it is allowed and its GFLOP/s beat fp32's by `margin`, else fp32."""
    return "bf16" if "bf16" in allowed and bf16 >= margin * fp32 else "fp32"


def cuda_choice(capability: tuple[int, int], allowed: Sequence[str]) -> tuple[str, str]:
    """(precision, reason) for a CUDA device of compute `capability`.

    From compute capability 8.0 (Ampere) tensor cores run bf16 as fast as fp16, and bf16 keeps
    fp32's exponent range, so nothing overflows (training needs no loss scaling). Older GPUs
    emulate bf16 slowly: fp16 where the command allows it (extraction), else fp32.
    """
    cap = f"compute capability {capability[0]}.{capability[1]}"
    if capability[0] >= 8 and "bf16" in allowed:
        return "bf16", f"CUDA {cap}: tensor cores run bf16 at fp16 speed with fp32's range"
    if "fp16" in allowed:
        return "fp16", f"CUDA {cap} has no bf16 tensor cores; fp16 autocast uses the tensor cores it has"
    return "fp32", f"CUDA {cap} has no bf16 tensor cores"


def resolve_precision(requested: str, device: str, allowed: Sequence[str], *, recorded: str | None = None,
                      where: str = "") -> PrecisionChoice:
    """The concrete precision to run for `--precision requested` on `device`.

    A concrete request is kept. `auto` takes, in order: `recorded`, the precision of the results
    being resumed (`where` names them), so a resumed cache or results folder is never mixed;
    bf16 on CUDA (fp16 or fp32 before compute capability 8.0, see :func:`cuda_choice`); on the
    CPU, bf16 only where the probe (:func:`cpu_probe`, cached per machine) measures it faster by
    `BF16_MARGIN`, since a CPU without AMX runs bf16 slower than fp32. The choice is logged.
    """
    check_precision(requested, device, allowed)
    if requested != AUTO:
        return PrecisionChoice(requested, requested, "requested")
    if recorded is not None and recorded in allowed and recorded != AUTO and \
            (recorded != "fp16" or device.startswith("cuda")):
        choice = PrecisionChoice(AUTO, recorded, f"resuming {where or 'earlier results'}, made in {recorded}")
    elif device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        choice = PrecisionChoice(AUTO, *cuda_choice(torch.cuda.get_device_capability(index), allowed))
    else:
        probe = cpu_probe()
        precision = cpu_choice(probe["fp32"], probe["bf16"], allowed)
        where = (f"measured while the machine was busy ({probe['busy']}), not kept" if probe.get("busy") else
                 f"{'cached' if probe['cached'] else 'measured'} at {probe['cache']}")
        reason = (f"bf16 matmul {probe['bf16']:.0f} GFLOP/s vs fp32 {probe['fp32']:.0f} GFLOP/s on {probe['key']}"
                  f" (bf16 needs {BF16_MARGIN:.2f}x), {where}")
        choice = PrecisionChoice(AUTO, precision, reason, probe)
    log.info("precision auto -> %s: %s", choice.precision, choice.reason)
    return choice


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes of RAM that can be used without swapping (MemAvailable; free pages where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
