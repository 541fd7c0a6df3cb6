"""Where extraction and training runs execute: in this process ("local") or on a Ray cluster ("ray").

Ray is an optional extra (`pip install 'trailers12k_feats[ray]'`): nothing here imports it
until a run asks for the Ray engine, so `import trailers12k_feats` and `t12k --help` stay
light. :class:`EngineConfig` holds the engine and the Ray settings of both stages;
:func:`import_ray` and :func:`connect` turn a missing extra or an unreachable cluster into
one sentence.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from types import ModuleType

from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
INSTALL = "pip install 'trailers12k_feats[ray]'"
_ADDRESS = re.compile(r"auto|local|ray://[^\s:/]+:\d+|[^\s:/]+:\d+")


@dataclass(frozen=True)
class EngineConfig:
    """The engine of a run and, for `ray`, how it uses the cluster.

    The Ray fields apply only with `engine="ray"`; given with the local engine they are refused,
    since they would be silently ignored.
    """

    engine: str = "local"
    # None: start a Ray instance on this machine for the run; "auto": join the cluster this machine
    # belongs to (`ray start`); "ray://HOST:PORT": a remote cluster through Ray Client.
    address: str | None = None
    decode_cpus: float = 1.0  # CPUs of each decoding task (decoding, shot cuts, clipping, cropping)
    gpus_per_actor: float | None = None  # GPUs of each model actor; None: 1 when the cluster has GPUs, else 0
    actors: int = 0  # model actors; 0: GPUs / gpus_per_actor, or half the CPUs (at least 1) without GPUs
    actor_cpus: float = 1.0  # CPUs of each model actor (its torch threads when it runs on the CPU)
    # Extraction: take the trailers in input order, so batches hold the same clips as the local engine's
    # (bit-equal fp32 features), or each clip chunk as it comes (no trailer waits for an earlier one's
    # decoding); None: in order with CPU actors, as they come with GPU actors.
    ordered: bool | None = None
    cpus_per_run: float = 1.0  # CPUs of each training task (a run or a group of runs)
    max_retries: int = 3  # Ray retries of a task or actor that dies (node lost, OOM kill)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise T12kError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}.")
        if self.engine == "local":
            set_ = [f.name for f in dataclasses.fields(self) if f.name != "engine"
                    and getattr(self, f.name) != f.default]
            if set_:
                raise T12kError(f"{', '.join('--' + n.replace('_', '-') for n in set_)} apply only to the Ray "
                                f"engine; add --engine ray or leave them out.")
            return
        if self.address is not None and not _ADDRESS.fullmatch(self.address):
            raise T12kError(f"--ray-address must be auto, HOST:PORT or ray://HOST:PORT, got {self.address!r}.")
        if self.decode_cpus <= 0 or self.actor_cpus < 0 or self.cpus_per_run <= 0:
            raise T12kError("--decode-cpus and --cpus-per-run must be > 0 and --actor-cpus >= 0.")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise T12kError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}.")
        if self.actors < 0 or self.max_retries < 0:
            raise T12kError("--actors and max_retries must be >= 0 (--actors 0: as many as the cluster fits).")

    @property
    def ray(self) -> bool:
        return self.engine == "ray"


def import_ray() -> ModuleType:
    """The `ray` module, or one sentence saying how to install it."""
    try:
        import ray
    except ImportError:
        raise T12kError(f"--engine ray needs Ray, which is not installed; run {INSTALL}.") from None
    return ray


def connect(cfg: EngineConfig, **init: object) -> ModuleType:
    """`ray`, connected to the cluster of `cfg.address` (or a new local instance); a connection made
    earlier in this process (tests, notebooks) is reused as it is. `init` goes to `ray.init`."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False, **init)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = cfg.address or "a new local instance"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise T12kError(f"cannot connect to the Ray cluster at {where} ({first}); start it with `ray start --head` "
                        f"or check --ray-address.") from None
    res = ray.cluster_resources()
    log.info("Ray cluster: %g CPUs, %g GPUs, %d node(s)", res.get("CPU", 0), res.get("GPU", 0),
             len([n for n in ray.nodes() if n.get("Alive")]))
    return ray


def ray_get(ray: ModuleType, refs: object) -> object:
    """ray.get, a T12kError raised in a task or actor coming back as itself: one sentence, no traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, T12kError):
            raise T12kError(str(e.cause)) from None
        raise
