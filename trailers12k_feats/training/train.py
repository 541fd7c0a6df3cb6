"""Train and evaluate one DIViTA head on cached features (the protocol of docs/paper.md).

Random 30-clip windows for training; snippet-averaged sigmoid probabilities for evaluation;
AdamW (amsgrad), ReduceLROnPlateau and early stopping on validation loss; the
best-validation-loss weights are evaluated on val and test. What the padding of a snippet does,
which validation loss is used and which trailers train follow `TrainConfig.protocol`
(protocols.py); the evaluation itself is in evaluation.py. A run directory (rundir.py) holds
config.json, history.csv, best.pt, predictions.csv and metrics.json, and appears only
when the run has finished.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as Fn
from tqdm import tqdm

from trailers12k_feats import cache as cache_mod
from trailers12k_feats.runtime import (
    AUTO,
    PRECISIONS,
    PrecisionChoice,
    check_device,
    check_precision,
    resolve_precision,
)
from trailers12k_feats.training.data import (
    Metadata,
    TrailerData,
    align,
    check_splits,
    load_metadata,
    to_device,
)
from trailers12k_feats.training.evaluation import evaluate_model, snippet_probs
from trailers12k_feats.training.heads import (
    FUSIONS,
    TEMPORAL,
    build_divita,
    count_params,
    set_dropout_generator,
)
from trailers12k_feats.training.metrics import format_metrics
from trailers12k_feats.training.protocols import (
    batch_logits,
    check_protocol,
    head_options,
    training_set,
)
from trailers12k_feats.training.rundir import save_run
from trailers12k_feats.training.streams import check_caches, resolve_streams
from trailers12k_feats.utils import (
    T12kError,
    check_writable,
    seed_everything,
    tune_malloc,
)

log = logging.getLogger(__name__)

TRAIN_PRECISIONS = (AUTO, "bf16", "fp32")  # the heads are not trained in fp16


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the paper's settings; `protocol` defaults to masked
    (t12k reproduce runs the authors', see protocols.py)."""

    split: int = 0
    temporal: str = "tsfm"
    fusion: str = "late"
    window: int = 30  # clips per training window and per evaluation snippet
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    amsgrad: bool = True
    max_epochs: int = 100
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    early_stop_patience: int = 20
    dropout: float = 0.25
    seed: int = 0
    # autocast dtype for matmuls: "bf16" (AMX/tensor cores), "fp32", or "auto": bf16 on CUDA, and on
    # the CPU whichever a cached matmul probe finds faster (runtime.resolve_precision)
    precision: str = AUTO
    eval_batch_size: int = 512
    device: str = "cpu"  # "cpu" or "cuda[:N]": features move to a GPU once when they fit (data.to_device)
    protocol: str = "masked"  # "authors" (the authors' code) or "masked" (padding masked): see protocols.py

    def __post_init__(self) -> None:
        check_splits([self.split])
        check_protocol(self.protocol)
        if self.temporal not in TEMPORAL:
            raise T12kError(f"unknown temporal module {self.temporal!r}; valid: {', '.join(TEMPORAL)}.")
        if self.fusion not in FUSIONS:
            raise T12kError(f"unknown fusion {self.fusion!r}; valid: {', '.join(FUSIONS)}.")
        for name in ("window", "batch_size", "max_epochs", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise T12kError(f"{name} must be at least 1, got {getattr(self, name)}.")
        check_device(self.device)
        check_precision(self.precision, self.device, TRAIN_PRECISIONS)
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise T12kError(f"lr must be a finite number in (0, 1], got {self.lr}; larger AdamW steps make training "
                            f"diverge (the protocol uses 1e-4).")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise T12kError(f"weight_decay must be a finite number >= 0, got {self.weight_decay} (the protocol uses "
                            f"0.01).")
        if not (0 <= self.dropout < 1 and 0 < self.plateau_factor < 1):
            raise T12kError("need 0 <= dropout < 1 and 0 < plateau_factor < 1.")


@dataclass
class RunResult:
    best_epoch: int
    epochs: int
    val: dict[str, float]
    test: dict[str, float]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """Best epoch, validation and test metrics, as `t12k train` prints them."""
        return (f"best epoch {self.best_epoch}/{self.epochs}\n  val  {format_metrics(self.val)}\n"
                f"  test {format_metrics(self.test)}")


@dataclass(frozen=True)
class TrainJob:
    """One run of `t12k train`: the metadata, the streams (a Table 6 row and/or names or .h5 paths
    in `cache_dir`), the run directory to create and the training settings."""

    metadata: Path
    cache_dir: Path
    out: Path
    row: str | None = None
    image: str | None = None
    video: str | None = None
    on_missing: str = "error"
    allow_mismatched_clips: bool = False  # fuse streams whose fps, fpc or segmentation differ
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.on_missing not in ("error", "warn"):
            raise T12kError(f"on_missing must be 'error' or 'warn', got {self.on_missing!r}.")


def load_streams(meta: Metadata, caches: dict[str, Path], on_missing: str = "error",
                 allow_mismatched_clips: bool = False) -> tuple[dict, np.ndarray]:
    """Load the caches of each role ("image", "video") and the metadata rows they all hold.

    Before anything is loaded, each cache must have the dim of the stream it is named after and
    two fused caches the same clip settings (fps, fpc, segmentation) unless `allow_mismatched_clips`.
    """
    check_caches(caches.values(), allow_mismatched_clips)
    sets = {role: cache_mod.load(p) for role, p in caches.items()}
    return sets, align(meta, list(sets.values()), on_missing)


def _split_data(meta: Metadata, sets: dict, rows: np.ndarray, split: int) -> dict[str, TrailerData]:
    present = np.zeros(len(meta), bool)
    present[rows] = True
    out = {}
    for name in ("train", "val", "test"):
        sub = meta.subset(split, name)
        sub = sub[present[sub]]
        if len(sub) == 0:
            raise T12kError(f"the {name} set of split{split} has no trailer present in the caches.")
        out[name] = TrailerData.from_metadata(meta, sets, sub)
    return out


def dropout_generator(device: torch.device) -> torch.Generator:
    """A generator on `device` that continues torch's global random stream from here. Made right
    after a run's model is initialised, it gives the run its own dropout masks (the ones the
    global stream gave it before runs had their own), whatever other runs draw meanwhile."""
    gen = torch.Generator(device)
    gen.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
    return gen


def adamw(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """The optimiser a run steps: torch's fused AdamW with the run's lr, weight decay and amsgrad."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True, amsgrad=cfg.amsgrad)


def diverged(desc: str, what: str) -> T12kError:
    """The error of a run whose loss became NaN or Inf (`what` says which loss, where)."""
    return T12kError(f"{desc}: {what}; training diverged, lower --lr or use --precision fp32.")


def train_precision(cfg: TrainConfig, **kw) -> PrecisionChoice:
    """The concrete precision `cfg.precision` runs in (`kw`: recorded, where; see resolve_precision)."""
    return resolve_precision(cfg.precision, cfg.device, TRAIN_PRECISIONS, **kw)


@dataclass
class EpochLog:
    """A run's epochs as training records them (history.csv's rows), its best validation loss
    and epoch, and when it stops: `patience` epochs without a better loss, or a non-finite one."""

    desc: str
    protocol: str
    patience: int
    history: list[dict] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0  # 0: no epoch with a finite loss yet

    def add(self, epoch: int, train_loss: float, val_loss: float, val_m: dict[str, float], lr: float,
            seconds: float) -> tuple[bool, bool]:
        """Record an epoch; (whether it is the best so far, whether the run stops after it).

        A non-finite validation loss stops a run of the authors' protocol that has a best epoch
        (their EarlyStopping(check_finite=True) ends on the best checkpoint) and raises otherwise.
        """
        self.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                             **{f"val_{k}": val_m[k] for k in ("uAP", "mAP", "wAP", "sAP")},
                             "seconds": round(seconds, 2)})
        if not math.isfinite(val_loss):
            if self.protocol == "authors" and self.best_epoch:
                log.warning("%s: validation loss is %s at epoch %d; stopping and keeping epoch %d",
                            self.desc, val_loss, epoch, self.best_epoch)
                return False, True
            raise diverged(self.desc, f"validation loss is {val_loss} at epoch {epoch}")
        improved = val_loss < self.best_loss
        if improved:
            self.best_loss, self.best_epoch = val_loss, epoch
        return improved, epoch - self.best_epoch >= self.patience


class Trainer:
    """Holds the model, optimiser and data of one run; `fit()` runs the protocol.

    `self.cfg` is `cfg` with `--precision auto` resolved: by `precision` when given (it must be
    the choice for `cfg.precision`), else now.
    """

    def __init__(self, cfg: TrainConfig, data: dict[str, TrailerData],
                 precision: PrecisionChoice | None = None) -> None:
        unlabelled = [k for k, d in data.items() if d.labels is None]
        if unlabelled:
            raise T12kError(f"training needs labelled trailers, but {', '.join(unlabelled)} has none; "
                            "build the data with TrailerData.from_metadata.")
        self.precision = precision or train_precision(cfg)
        if self.precision.requested != cfg.precision:
            raise T12kError(f"the precision choice is for --precision {self.precision.requested}, but the config "
                            f"asks for {cfg.precision}; resolve it with train_precision(cfg).")
        cfg = dataclasses.replace(cfg, precision=self.precision.precision)
        self.cfg = cfg
        train, self.left_out = training_set(data["train"], cfg.protocol, cfg.window)
        self.data = {**data, "train": train}  # in host RAM: the epoch's windows are drawn from it
        tune_malloc()
        dims = data["train"].dims()
        self.gen = seed_everything(cfg.seed)
        self.device = torch.device(cfg.device)
        self.on_device = to_device([self.data], self.device)[0]  # what batches are gathered from
        self.model = build_divita(dims.get("image"), dims.get("video"), temporal=cfg.temporal, fusion=cfg.fusion,
                                  dropout=cfg.dropout, **head_options(cfg.protocol)).to(self.device)
        set_dropout_generator(self.model, dropout_generator(self.device))
        self.opt = adamw(self.model.parameters(), cfg)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, mode="min", factor=cfg.plateau_factor,
                                                                patience=cfg.plateau_patience)
        self.dtype = PRECISIONS[cfg.precision]

    def _logits(self, batch) -> torch.Tensor:
        return batch_logits(self.model, batch, self.device, self.dtype)

    def step(self, rows: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """One optimiser step on the windows of training trailers `rows` (B,) from clips `first`
        (B,), both where the features are; the loss stays on the device (no host synchronisation)."""
        batch = self.on_device["train"].gather(rows, first, self.cfg.window, torch.float32)
        loss = Fn.binary_cross_entropy_with_logits(self._logits(batch), batch.y.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def train_epoch(self, progress: bool = False, epoch: int = 1, desc: str = "epochs") -> float:
        cfg, d = self.cfg, self.data["train"]
        self.model.train()
        where = self.on_device["train"].device
        # The epoch's windows, drawn on the CPU as random_windows draws them, then sent once.
        order, first = (t.to(where, non_blocking=True) for t in d.epoch_windows(cfg.batch_size, cfg.window,
                                                                                self.gen))  # (n,), (n,)
        total = torch.zeros((), device=self.device)  # the sum of every window's loss
        losses = []  # per step, on the device: checked once per epoch, so no step waits for the device
        steps = range(0, len(d), cfg.batch_size)
        for s in tqdm(steps, desc="train", unit="batch", leave=False, disable=not progress):
            loss = self.step(order[s:s + cfg.batch_size], first[s:s + cfg.batch_size])
            losses.append(loss)
            total += loss * min(cfg.batch_size, len(d) - s)  # the step's windows
        step_loss = torch.stack(losses).cpu()  # (steps,)
        if not bool(torch.isfinite(step_loss).all()):
            step = int((~torch.isfinite(step_loss)).nonzero()[0, 0])
            raise diverged(desc, f"training loss is {float(step_loss[step])} at epoch {epoch}, step {step + 1} of "
                                 f"{len(losses)}")
        return float(total) / len(d)

    def predict(self, d: TrailerData) -> torch.Tensor:
        """Snippet-averaged sigmoid probabilities (n, 10) for every trailer of `d`."""
        return snippet_probs(self.model, d, self.cfg)

    def evaluate(self, d: TrailerData) -> tuple[float, dict[str, float], torch.Tensor]:
        """(validation loss of the protocol, metrics, snippet-averaged probabilities (n, 10))."""
        return evaluate_model(self.model, d, self.cfg)

    def fit(self, progress: bool = True, desc: str = "epochs",
            on_epoch: Callable[[int], None] | None = None) -> RunResult:
        """Train until the protocol stops; `on_epoch(epoch)` is called as each epoch starts."""
        cfg = self.cfg
        t0 = time.perf_counter()
        epochs, best_state = EpochLog(desc, cfg.protocol, cfg.early_stop_patience), None
        bar = tqdm(range(1, cfg.max_epochs + 1), desc=desc, unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            if on_epoch is not None:
                on_epoch(epoch)
            train_loss = self.train_epoch(epoch=epoch, desc=desc)
            val_loss, val_m, _ = self.evaluate(self.on_device["val"])
            lr = self.opt.param_groups[0]["lr"]
            self.sched.step(val_loss)
            improved, stop = epochs.add(epoch, train_loss, val_loss, val_m, lr, time.perf_counter() - t0)
            if not math.isfinite(val_loss):
                break  # the authors' protocol keeps the best epoch (EpochLog.add raised otherwise)
            if improved:
                best_state = copy.deepcopy(self.model.state_dict())
            bar.set_postfix(loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4f}", val_uAP=f"{val_m['uAP']:.2f}",
                            best=epochs.best_epoch)
            log.debug("epoch %d train %.4f val %.4f %s", epoch, train_loss, val_loss, format_metrics(val_m))
            if stop:
                break
        self.model.load_state_dict(best_state)
        _, val_m, self.val_probs = self.evaluate(self.on_device["val"])
        _, test_m, self.test_probs = self.evaluate(self.on_device["test"])
        return RunResult(epochs.best_epoch, len(epochs.history), val_m, test_m, epochs.history,
                         time.perf_counter() - t0)


def log_start(desc: str, cfg: TrainConfig, sets: dict[str, cache_mod.FeatureSet], data: dict[str, TrailerData],
              n_params: int) -> None:
    """The log line that opens a run: its streams, size, protocol and trailers."""
    log.info("%s: %s, %d params, protocol %s, train/val/test %d/%d/%d trailers", desc,
             " + ".join(f"{r}={fs.name}" for r, fs in sets.items()), n_params, cfg.protocol,
             len(data["train"]), len(data["val"]), len(data["test"]))


def log_end(desc: str, result: RunResult) -> None:
    """The log line that closes a run: best epoch, time and test metrics."""
    log.info("%s: best epoch %d of %d, %.0f s; test %s", desc, result.best_epoch, result.epochs, result.seconds,
             format_metrics(result.test))


def train_run(cfg: TrainConfig, meta: Metadata, sets: dict[str, cache_mod.FeatureSet], rows: np.ndarray,
              out_dir: str | os.PathLike | None = None, progress: bool = True, desc: str = "epochs",
              precision: PrecisionChoice | None = None,
              on_epoch: Callable[[int], None] | None = None) -> RunResult:
    """Train one configuration on split `cfg.split`; write a run directory if `out_dir` is given.

    `precision`: the resolved `cfg.precision` (resolved here when None); config.json records the
    config with it resolved and, under "precision", what was asked for and why this was chosen.
    `on_epoch(epoch)` is called as each epoch starts.
    """
    trainer = Trainer(cfg, _split_data(meta, sets, rows, cfg.split), precision)
    log_start(desc, trainer.cfg, sets, trainer.data, count_params(trainer.model))  # the training set of the protocol
    result = trainer.fit(progress=progress, desc=desc, on_epoch=on_epoch)
    log_end(desc, result)
    if out_dir is not None:
        save_run(out_dir, trainer.cfg, meta, sets, trainer.data, trainer.left_out, trainer.model, result,
                 trainer.val_probs, trainer.test_probs, trainer.precision)
    return result


def train_from_caches(job: TrainJob, progress: bool = True) -> RunResult:
    """`t12k train`: resolve and check the job's caches, train split `job.train.split`, save `job.out`."""
    caches = resolve_streams(job.cache_dir, job.row, job.image, job.video)
    if job.out.exists():
        raise T12kError(f"run directory {job.out} already exists; choose another --out or delete it.")
    check_writable(job.out, "run directory", replace=True)
    meta = load_metadata(job.metadata)
    meta.check_splits([job.train.split])
    precision = train_precision(job.train)
    sets, rows = load_streams(meta, caches, job.on_missing, job.allow_mismatched_clips)
    return train_run(job.train, meta, sets, rows, job.out, progress=progress, desc=f"split{job.train.split}",
                     precision=precision)
