"""Table 6: the 8 rows x 3 splits, resumable, with the paper's numbers beside ours.

Layout of the results directory::

    reproduce_config.json        training settings shared by every run, protocol included (checked on resume;
                                 the precision as resolved: `auto` resumes in the recorded one)
    data.json                    what the runs were trained on: the metadata file and each stream's
                                 cache (path, size, shape, dtype, content fingerprint; checked on resume)
    runs/<row>/split<k>/         one finished run directory each (see train.py)
    val.csv, tst.csv             one line per finished run: run, split, epoch, metrics, genres
    summary.csv, summary.md      mean and sample std (ddof 1) over splits, paper beside ours
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trailers12k_feats import cache as cache_mod
from trailers12k_feats.paper import TABLE6, get_row
from trailers12k_feats.runtime import PrecisionChoice, available_memory, usable_cores
from trailers12k_feats.training.data import SPLITS, check_splits, load_metadata
from trailers12k_feats.training.group_rules import (
    centres_clips,
    group_problem,
    hands_off_runs,
)
from trailers12k_feats.training.group_runs import train_group
from trailers12k_feats.training.handoff import RunState
from trailers12k_feats.training.processes import share_threads, train_at_once
from trailers12k_feats.training.protocols import check_protocol
from trailers12k_feats.training.streams import check_clips, check_dim, resolve_streams
from trailers12k_feats.training.tables import write_results
from trailers12k_feats.training.train import (
    TrainConfig,
    load_streams,
    train_precision,
    train_run,
)
from trailers12k_feats.utils import (
    T12kError,
    check_writable,
    config_dict,
    write_json,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReproduceConfig:
    """Which rows and splits to run, where the inputs are and where results go."""

    metadata: Path
    cache_dir: Path
    out_dir: Path = Path("results/transfer")
    rows: tuple[str, ...] = tuple(TABLE6)
    splits: tuple[int, ...] = SPLITS
    on_missing: str = "error"
    # Fuse streams whose fps, fpc or segmentation differ. Not a TrainConfig field, so the training
    # settings that a results folder records (and compares on resume) stay as they were.
    allow_mismatched_clips: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    # The protocol of every run (protocols.py), the paper's by default; it replaces train.protocol.
    protocol: str = "authors"
    # Train the unfinished splits of a row as one group (grouped.py): same results, less time.
    # Not a TrainConfig field either: a folder may mix runs trained alone and in groups.
    group: bool = True
    # Processes training rows at once, a row each (processes.py), and the runs groups hand to a
    # process with no row left; 0: as many as the cores and RAM allow (job_count, jobs_for). A
    # GPU's small steps leave it idle between launches, so processes fill it.
    jobs: int = 0

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        if self.jobs < 0:
            raise T12kError(f"jobs must be 0 (automatic) or at least 1, got {self.jobs}.")
        object.__setattr__(self, "train", dataclasses.replace(self.train, protocol=self.protocol))
        object.__setattr__(self, "rows", tuple(get_row(r).name for r in self.rows))
        if not self.rows:
            raise T12kError("select at least one Table 6 row.")
        object.__setattr__(self, "splits", check_splits(self.splits))


def _run_dir(cfg: ReproduceConfig, row: str, split: int) -> Path:
    return cfg.out_dir / "runs" / row / f"split{split}"


def _check_inputs(cfg: ReproduceConfig, todo: list[tuple[str, int]]) -> None:
    """Every cache needed by an unfinished run exists, has the stream's dim and finite values, and
    the two caches of a fusion row share their clip settings."""
    meta = load_metadata(cfg.metadata)
    meta.check_splits(sorted({s for _, s in todo}))
    meta_ids = set(meta.ids)
    rows = {row: resolve_streams(cfg.cache_dir, row=row) for row in dict.fromkeys(r for r, _ in todo)}
    attrs = {}
    for path in sorted({p for caches in rows.values() for p in caches.values()}):
        attrs[path] = cache_mod.validate(path, trust_record=True)  # values: as loading checks them
        check_dim(path, attrs[path])
        ids = set(cache_mod.read_ids(path))
        if not ids & meta_ids:
            raise T12kError(f"no trailer id of cache {path} is in {cfg.metadata}; the cache belongs to another "
                            f"corpus.")
        if cfg.on_missing == "error" and not meta_ids <= ids:
            missing = sorted(meta_ids - ids)
            raise T12kError(f"{len(missing)} trailers of {cfg.metadata} are missing from cache {path} "
                            f"(e.g. {', '.join(missing[:3])}); pass --on-missing warn to drop them.")
    for caches in rows.values():
        if len(caches) > 1:  # refused here, before any run; load_streams logs the warnings
            check_clips({p: attrs[p] for p in caches.values()}, cfg.allow_mismatched_clips)


def _recorded_precision(cfg: ReproduceConfig) -> str | None:
    """The precision the runs of the results directory were made in, None where none is recorded."""
    path = cfg.out_dir / "reproduce_config.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: _check_settings says so
        return None
    return old.get("precision") if isinstance(old, dict) else None


def _check_settings(cfg: ReproduceConfig, precision: str) -> None:
    """Refuse to mix runs made with different training settings in one results directory.

    `precision` is `cfg.train.precision` resolved: the arithmetic of the runs is what must match.
    """
    path = cfg.out_dir / "reproduce_config.json"
    settings = {k: v for k, v in config_dict(cfg.train).items() if k != "split"} | {"precision": precision}
    if path.exists():
        old = {"protocol": "masked", **json.loads(path.read_text())}  # folders older than protocols ran masked
        diff = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        if diff:
            raise T12kError(f"{cfg.out_dir} holds runs made with other training settings ({', '.join(diff)}); "
                            f"choose another --out or delete it.")
    else:
        write_json(path, settings)


CACHE_FIELDS = ("trailers", "clips", "feature_dim", "dtype", "bytes", "sha256")  # compared; the path is not


def _data_identity(cfg: ReproduceConfig, todo: list[tuple[str, int]]) -> dict:
    """The metadata file and the cache of each stream that the unfinished runs will train on."""
    meta = cfg.metadata.resolve()
    caches = {p.stem: p.resolve() for row in dict.fromkeys(r for r, _ in todo)
              for p in resolve_streams(cfg.cache_dir, row=row).values()}
    return {"metadata": {"path": str(meta), "bytes": meta.stat().st_size,
                         "sha256": hashlib.sha256(meta.read_bytes()).hexdigest()},
            "caches": {name: cache_mod.fingerprint(p) for name, p in caches.items()}}


def _show_change(field: str, old: object, new: object) -> str:
    if field == "sha256":
        return f"content (sha256 {str(old)[:12]} -> {str(new)[:12]})"
    return f"{field} ({old} -> {new})"


def _recorded_data(cfg: ReproduceConfig) -> dict | None:
    """The contents of data.json, or None where the results directory has none."""
    path = cfg.out_dir / "data.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not (isinstance(data, dict) and isinstance(data.get("caches", {}), dict)):
            raise ValueError("not an object with a caches object")
        return data
    except (OSError, ValueError) as e:
        raise T12kError(f"{path} cannot be read ({e}); restore it, or choose another --out or delete "
                        f"{cfg.out_dir}.") from None


def _check_data(cfg: ReproduceConfig, ident: dict) -> None:
    """Refuse to add runs trained on other data than the runs a results directory holds (data.json)."""
    old = _recorded_data(cfg)
    if old is None:
        finished = len(list((cfg.out_dir / "runs").glob("*/split*/metrics.json")))
        if finished:
            log.warning("%s has no data.json (it was made by an earlier version), so its %d finished runs cannot "
                        "be checked against the data; recording the data of this rerun as theirs", cfg.out_dir,
                        finished)
        return
    problems = []
    m, om = ident["metadata"], old.get("metadata")
    if om and m["sha256"] != om["sha256"]:
        problems.append(f"metadata {m['path']} differs from the recorded {om['path']} in "
                        f"{_show_change('sha256', om['sha256'], m['sha256'])}")
    for name, c in ident["caches"].items():
        oc = old.get("caches", {}).get(name)
        changed = [_show_change(f, oc.get(f), c[f]) for f in CACHE_FIELDS if oc.get(f) != c[f]] if oc else []
        if changed:
            problems.append(f"cache {c['path']} of stream {name} differs from the recorded {oc['path']} in "
                            f"{', '.join(changed)}")
    if problems:
        raise T12kError(f"{cfg.out_dir} holds runs trained on other data: {'; '.join(problems)}; point --data-dir "
                        f"(or --metadata, --cache-dir) at the data these runs used, or choose another --out or "
                        f"delete it.")


def _record_data(cfg: ReproduceConfig, ident: dict, streams: list[str]) -> None:
    """Add the metadata and the caches of `streams` (those of a finished run) to data.json."""
    old = _recorded_data(cfg) or {}
    caches = {**old.get("caches", {}), **{s: ident["caches"][s] for s in streams}}
    write_json(cfg.out_dir / "data.json", {"metadata": old.get("metadata", ident["metadata"]), "caches": caches})


@dataclass
class Plan:
    """What a results folder still needs: the unfinished (row, split) runs, the precision they run in and
    the identity of the data they train on (empty when nothing is left)."""

    todo: list[tuple[str, int]]
    precision: PrecisionChoice
    ident: dict


def prepare(cfg: ReproduceConfig) -> Plan:
    """Every check before any run (outputs, inputs, settings, data), the results folder's settings
    recorded; finished runs are left out of the plan."""
    todo = [(r, s) for r in cfg.rows for s in cfg.splits if not (_run_dir(cfg, r, s) / "metrics.json").exists()]
    done = len(cfg.rows) * len(cfg.splits) - len(todo)
    check_writable(cfg.out_dir)
    if todo:
        _check_inputs(cfg, todo)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    precision = train_precision(cfg.train, recorded=_recorded_precision(cfg), where=f"the runs in {cfg.out_dir}")
    _check_settings(cfg, precision.precision)
    ident = _data_identity(cfg, todo) if todo else {}
    if todo:
        _check_data(cfg, ident)
    if done:
        log.info("%d of %d runs already finished in %s; skipping them", done, done + len(todo), cfg.out_dir)
    return Plan(todo, precision, ident)


def units(cfg: ReproduceConfig, todo: list[tuple[str, int]], spread: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """The (row, splits) that train together: a row's unfinished splits. With `spread`, a row whose
    splits do not train as one group (cfg.group off, or group_problem) becomes one unit per split."""
    out = []
    for row in dict.fromkeys(r for r, _ in todo):
        splits = tuple(s for r, s in todo if r == row)
        cfgs = [dataclasses.replace(cfg.train, split=s) for s in splits]
        grouped = cfg.group and len(cfgs) > 1 and group_problem(cfgs) is None
        out += [(row, splits)] if grouped or not spread else [(row, (s,)) for s in splits]
    return out


def train_unit(cfg: ReproduceConfig, row: str, splits: tuple[int, ...], precision: PrecisionChoice,
               progress: bool = True, on_finish: Callable[[], None] | None = None,
               on_epoch: Callable[[int], None] | None = None, resume: RunState | None = None,
               hand_off: Callable[[], bool] | None = None,
               on_hand_off: Callable[[int, RunState], None] | None = None) -> None:
    """Train the runs of `row` on `splits` (as one group where they can be) into their run directories;
    `on_finish()` after each run, `on_epoch(epoch)` as each epoch starts. `resume`: the state of
    the one run of `splits`, handed off by another group; `hand_off`, `on_hand_off`: see
    grouped.GroupTrainer.fit."""
    meta = load_metadata(cfg.metadata)
    caches = resolve_streams(cfg.cache_dir, row=row)
    sets, rows = load_streams(meta, caches, cfg.on_missing, cfg.allow_mismatched_clips)
    cfgs = [dataclasses.replace(cfg.train, split=s) for s in splits]
    descs = [f"{row} split{s}" for s in splits]

    def finished(j: int, result: object) -> None:
        if on_finish is not None:
            on_finish()

    problem = group_problem(cfgs) if len(cfgs) > 1 else None
    if resume is not None or (cfg.group and len(cfgs) > 1 and problem is None):  # a run handed off is a group too
        train_group(cfgs, meta, sets, rows, [_run_dir(cfg, row, s) for s in splits], progress=progress,
                    descs=descs, on_finish=finished, precision=precision, on_epoch=on_epoch,
                    resume=None if resume is None else [resume], hand_off=hand_off, on_hand_off=on_hand_off)
    else:
        if cfg.group and problem:
            log.info("%s: %s; training its %d runs one at a time", row, problem, len(cfgs))
        for j, train_cfg in enumerate(cfgs):
            finished(j, train_run(train_cfg, meta, sets, rows, _run_dir(cfg, row, train_cfg.split),
                                  progress=progress, desc=descs[j], precision=precision, on_epoch=on_epoch))


def record_finished(cfg: ReproduceConfig, plan: Plan, row: str) -> str:
    """After a run of `row` finished: its data in data.json, the tables rewritten; returns the test table."""
    _record_data(cfg, plan.ident, [p.stem for p in resolve_streams(cfg.cache_dir, row=row).values()])
    return write_results(cfg.out_dir, cfg.protocol)


MEMORY_SHARE = 0.7  # of the available RAM that the rows trained at once may load


def _row_cost(cfg: ReproduceConfig, row: str) -> int:
    """A row's share of the work, to start the longest first: its caches' bytes."""
    return sum(p.stat().st_size for p in resolve_streams(cfg.cache_dir, row=row).values())


def job_count(cfg: ReproduceConfig, rows: Sequence[str], runs: int = 0) -> int:
    """How many processes train Table 6 rows `rows` at once: `cfg.jobs`, or for 0 a process
    per usable core on the CPU (one thread each: a run's small operations then never wait for a
    second thread, which pays most on a busy machine) and per two cores on a GPU, as many as
    the rows' caches (twice, for groups that gather centred clips: group_rules.centres_clips) fit in
    MEMORY_SHARE of the available RAM, one at least; no more than the rows. `cfg.jobs` may go
    past the rows up to `runs` where groups hand runs to idle processes (`runs` > 0: handoff.py);
    0 does not, as a second process's start-up costs more than it gives a short row."""
    if cfg.jobs:
        return max(1, min(cfg.jobs, max(len(rows), runs)))
    cores = usable_cores()
    by_cores = cores // 2 if cfg.train.device.startswith("cuda") else cores
    # a group that gathers centred clips holds a second copy of its caches' features
    copies = 2 if cfg.group and centres_clips(cfg.train.device, cfg.train.precision) else 1
    by_memory = int(MEMORY_SHARE * available_memory() // max((copies * _row_cost(cfg, r) for r in rows), default=1))
    return max(1, min(len(rows), by_cores, by_memory))


def jobs_for(cfg: ReproduceConfig, work: list[tuple[str, tuple[int, ...]]], precision: str) -> int:
    """The processes `reproduce` trains units `work` in, in `precision` (resolved): job_count, an
    asked-for `jobs` up to a process per run where groups hand runs to idle processes
    (group_rules.hands_off_runs)."""
    hands_off = cfg.group and hands_off_runs(cfg.train.device, precision, cfg.train.protocol)
    return job_count(cfg, [row for row, _ in work], sum(len(s) for _, s in work) if hands_off else 0)


def reproduce(cfg: ReproduceConfig, progress: bool = True) -> str:
    """Run every selected (row, split) not already finished; return the test table."""
    plan = prepare(cfg)
    work = units(cfg, plan.todo)
    jobs = jobs_for(cfg, work, plan.precision.precision)
    if jobs <= 1:
        for row, splits in work:
            train_unit(cfg, row, splits, plan.precision, progress, lambda row=row: record_finished(cfg, plan, row))
        return write_results(cfg.out_dir, cfg.protocol)
    # Several rows at once, a process each (processes.py). Each writes its runs' directories as
    # they finish; this process records their data and tables as each of its units ends.
    log.info("training %d rows at once, a process each with %d CPU threads (more for the last rows, as the "
             "others end)", jobs, share_threads(usable_cores(), jobs, len(work)))
    work.sort(key=lambda unit: -_row_cost(cfg, unit[0]))  # the longest first: the last to end ends soonest
    train_at_once(cfg, plan, work, jobs, lambda row: record_finished(cfg, plan, row), progress)
    return write_results(cfg.out_dir, cfg.protocol)
