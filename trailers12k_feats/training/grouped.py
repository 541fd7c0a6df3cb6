"""Train a group of runs on the same streams as one batched model (docs/speed.md).

The runs of a group (the three splits of a Table 6 row, several seeds, a grid of learning
rates) share their streams and the shape of their head, so they train as one
`batched.GroupedDivita` whose parameters have a leading run dim: one batched matmul per
layer for all of them. Everything else stays each run's own: its trailers (train, val and
test of its split), its window generator and its dropout generator (seeded and drawn as
`train.Trainer` does, so a run draws the same windows and masks in a group as alone), its
optimiser (torch's fused AdamW, as Trainer's, over views of its slice of the batched
parameters: its own lr, weight decay and moments), its ReduceLROnPlateau schedule, early
stopping and best checkpoint. A run that stops leaves the group at once: its directory
is written as `train.train_run` writes it (the best weights evaluated by the single-run code)
and its slice is dropped, so the others go on with a smaller batch.

In fp32 a run trained in a group follows the run trained alone up to the rounding of the
batched matmuls (tests/test_grouped.py holds them to 1e-4 on the validation loss).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as Fn
from tqdm import tqdm

from trailers12k_feats import NUM_GENRES
from trailers12k_feats.runtime import PRECISIONS, autocast
from trailers12k_feats.training import fused, handoff
from trailers12k_feats.training.batched import GroupedDivita
from trailers12k_feats.training.data import (
    TrailerData,
    centred_table,
    to_device,
)
from trailers12k_feats.training.evaluation import evaluate_model, scored
from trailers12k_feats.training.group_rules import (
    centres_clips,
    group_problem,
    hands_off_runs,
)
from trailers12k_feats.training.handoff import RunState
from trailers12k_feats.training.heads import DivitaStream, build_divita, count_params
from trailers12k_feats.training.protocols import (
    eval_rows,
    head_options,
    snippet_loss,
    training_set,
)
from trailers12k_feats.training.run_layers import run_slice
from trailers12k_feats.training.run_optim import run_adamw, step_runs
from trailers12k_feats.training.train import (
    EpochLog,
    RunResult,
    TrainConfig,
    diverged,
    dropout_generator,
    log_end,
)
from trailers12k_feats.utils import T12kError, seed_everything, tune_malloc

log = logging.getLogger(__name__)

@dataclass
class _Run:
    """What a run of a group holds on its own."""

    cfg: TrainConfig
    desc: str
    data: dict[str, TrailerData]  # in host RAM; train is the protocol's training set
    left_out: int
    gen: torch.Generator  # windows, as Trainer.gen
    dropout: torch.Generator  # dropout masks, as the single head's
    views: list[torch.nn.Parameter]  # the run's slice of each batched parameter (shared storage)
    opt: torch.optim.AdamW  # over `views`, built as Trainer builds its own
    sched: torch.optim.lr_scheduler.ReduceLROnPlateau
    epochs: EpochLog
    best_state: dict | None = None
    on_device: dict[str, TrailerData] = field(default_factory=dict)  # `data` where batches are gathered
    # subset -> (owner, first, all clips real) (S,) each on the CPU, and (owner, first) where the features are
    snippets: dict = field(default_factory=dict)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]


class GroupTrainer:
    """Trains runs `cfgs` on their data (`datas[j]` is run j's {"train", "val", "test"}) as one
    batched model; `fit()` runs each run's protocol. See `group_problem` for what may differ.

    `centred`: gather the clips from a copy of each stream's features centred on its mean clip,
    in the autocast dtype (data.centred_table; the BatchNorm folds the offset into its bias), not
    from the features themselves. None: where that pays, in bf16 on the CPU (centres_clips),
    whose steps are bound by moving the clips. It costs a second copy of the features in RAM.

    `fused`: compute each transformer block, and the BatchNorm statistics and fold, as compiled
    code (training/fused.py), each chain of elementwise operations in one pass. None: where that
    pays, as `centred`. Where compiling fails (no C++ compiler) the group says why and trains with
    the eager code."""

    def __init__(self, cfgs: Sequence[TrainConfig], datas: Sequence[dict[str, TrailerData]],
                 descs: Sequence[str], centred: bool | None = None, fused: bool | None = None,
                 resume: Sequence[RunState] | None = None) -> None:
        problem = group_problem(cfgs, least=1 if resume else 2)
        if problem:
            raise T12kError(f"these runs cannot train as one group: {problem}.")
        self.cfg = cfg = cfgs[0]  # the settings every run shares
        self.device, self.dtype = torch.device(cfg.device), PRECISIONS[cfg.precision]
        tune_malloc()
        self.runs, models = [], []
        for c, data, desc in zip(cfgs, datas, descs):
            if any(d.labels is None for d in data.values()):
                raise T12kError(f"{desc}: training needs labelled trailers; build the data with "
                                f"TrailerData.from_metadata.")
            train, left_out = training_set(data["train"], c.protocol, c.window)
            gen = seed_everything(c.seed)  # then init and dropout stream exactly as Trainer.__init__
            dims = data["train"].dims()
            models.append(build_divita(dims.get("image"), dims.get("video"), temporal=c.temporal, fusion=c.fusion,
                                       dropout=c.dropout, **head_options(c.protocol)).to(self.device))
            self.runs.append(_Run(c, desc, {**data, "train": train}, left_out, gen, dropout_generator(self.device),
                                  [], None, None, EpochLog(desc, c.protocol, c.early_stop_patience)))
        features = [r.data["train"].features for r in self.runs]
        if any(f.keys() != features[0].keys() or any(f[k] is not features[0][k] for k in f) for f in features):
            raise T12kError("the runs of a group must train on the same loaded streams.")
        for r, d in zip(self.runs, to_device([r.data for r in self.runs], self.device, "the group")):
            r.on_device = d  # one copy of the features for every run
        self.features = self.runs[0].on_device["train"].features
        self.offsets: dict[str, torch.Tensor] | None = None  # {stream: (F,)} what the features are stored less
        if centred is None:
            centred = centres_clips(self.device, cfg.precision)
        if centred:
            tables = {k: centred_table(f, self.dtype) for k, f in self.features.items()}
            self.features = {k: t for k, (t, _) in tables.items()}
            self.offsets = {k: o for k, (_, o) in tables.items()}
            log.debug("the group gathers its clips centred, in %s (%.2f GiB)", self.dtype,
                      sum(t.numel() * t.element_size() for t in self.features.values()) / 2**30)
        self._idx: dict[tuple[int, ...], torch.Tensor | None] = {}
        self.n_params = count_params(models[0])
        self.model = GroupedDivita.from_models(models)
        self.fused = centres_clips(self.device, cfg.precision) if fused is None else fused
        if self.fused:
            self.fused = self._warm_up(models[0], cfg.protocol)
        self.model.use_fused(self.fused)
        # Whether a run may leave for another process (fit's hand_off): where the settings allow it
        # and the group gathers centred clips through the compiled chains, as they do by default.
        self.hands_off = (bool(self.fused) and self.offsets is not None
                          and hands_off_runs(self.device, cfg.precision, cfg.protocol))
        # Each run's own optimiser and schedule, as Trainer's, over views of its slice of the batched
        # parameters: the update is torch's AdamW itself, in place in the batched tensors.
        for j, r in enumerate(self.runs):
            c = r.cfg
            r.views = [torch.nn.Parameter(run_slice(p.data, j)) for p in self.model.parameters()]
            r.opt = run_adamw(r.views, c)
            r.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(r.opt, mode="min", factor=c.plateau_factor,
                                                                 patience=c.plateau_patience)
        # epochs finished and seconds trained: 0 but for runs handed off by another group
        self.epoch, self.seconds = 0, 0.0
        if resume:
            if len(resume) != len(self.runs) or len({s.epoch for s in resume}) != 1:
                raise ValueError("resume: a state per run, all after the same epoch.")
            for j, state in enumerate(resume):
                handoff.restore(self, j, state)
            self.epoch, self.seconds = resume[0].epoch, max(s.seconds for s in resume)

    def _warm_up(self, like: torch.nn.Module, protocol: str) -> bool:
        """Compile the fused block and chains for this group (fused.warm_up); False, with a warning
        saying why, where they cannot be."""
        t0 = time.perf_counter()
        streams = [m for m in like.modules() if isinstance(m, DivitaStream)]
        dims = [s.norm.num_features for s in streams]
        block = getattr(streams[0].temporal, "block", None)
        why = fused.warm_up(self.device, self.dtype, dims, block, self.cfg.window, masked=protocol != "authors")
        if why:
            log.warning("%s: the group's fused block and chains do not compile here (%s), so it trains with the "
                        "eager code, slower; torch.compile needs a C++ compiler (g++) to build them",
                        self.runs[0].desc, why)
            return False
        log.debug("fused block and chains compiled in %.1f s", time.perf_counter() - t0)
        return True

    def _opt_step(self, js: list[int]) -> None:
        """Each of runs `js` steps its own AdamW on its slice of the batched gradients
        (run_optim.step_runs); then the gradients are dropped."""
        params = list(self.model.parameters())
        step_runs(params, [(j, self.runs[j].views, self.runs[j].opt) for j in js])
        for p in params:
            p.grad = None

    def idx(self, js: list[int]) -> torch.Tensor | None:
        """Runs `js` (positions in self.runs) as the model's index on the device, None for all;
        made once per set of runs, so a step copies nothing to the device."""
        key = tuple(js)
        if key not in self._idx:
            # non_blocking: the first step of a new set of runs does not wait for the device either
            self._idx[key] = None if len(js) == len(self.runs) else torch.tensor(js).to(self.device, non_blocking=True)
        return self._idx[key]

    def _logits(self, x: dict[str, torch.Tensor], mask: torch.Tensor | None, idx: torch.Tensor | None,
                gens: list[torch.Generator] | None) -> torch.Tensor:
        x = {k: v.to(self.device, non_blocking=True) for k, v in x.items()}
        mask = None if mask is None else mask.to(self.device, non_blocking=True)
        with autocast(self.device.type, self.dtype):
            logits = self.model(ix=x.get("image"), vx=x.get("video"), ix_mask=mask, vx_mask=mask, idx=idx, gens=gens,
                                offsets=self.offsets)
        return logits.float()  # (R', B, 10)

    def _gather(self, views: list[tuple[TrailerData, torch.Tensor, torch.Tensor]],
                all_real: bool) -> tuple[dict, torch.Tensor | None]:
        """Clips first..first+window-1 of trailers rows of each run's (data, rows, first), as
        TrailerData.gather does for each: ({stream: (R', B, W, F)}, mask (R', B, W)); the mask is
        None when the caller knows every clip is real (the model then skips all masking: the same
        result, fewer passes). Clips come in float32, or less self.offsets in the autocast dtype;
        padding is a zero clip either way."""
        parts = [d.clip_index(rows, first, self.cfg.window) for d, rows, first in views]
        mask = None if all_real else torch.stack([m for _, m in parts])  # (R', B, W)
        x = {}
        for k, feats in self.features.items():
            where = torch.stack([ix[k] for ix, _ in parts])  # (R', B, W)
            # index_select copies whole rows: several times faster than indexing with a (R', B, W) tensor
            x[k] = feats.index_select(0, where.reshape(-1)).view(*where.shape, -1)  # (R', B, W, F)
            if self.offsets is None:
                x[k] = x[k].to(torch.float32)
                if mask is not None:
                    x[k].masked_fill_(~mask[..., None], 0.0)
            elif mask is not None:  # a zero clip, stored less the offset as the clips are; written in
                # place on the padded clips alone, a few per batch, where a select passed over every clip
                x[k][~mask] = -self.offsets[k].to(x[k].dtype)
        return x, mask

    def step(self, js: list[int], rows: list[torch.Tensor], firsts: list[torch.Tensor],
             all_real: bool) -> torch.Tensor:
        """One training step of runs `js` (positions in self.runs), run j on the windows of its
        training trailers rows[j] from clips firsts[j] (both where the features are); `all_real`:
        no window reaches past its trailer's end. Each run's loss (R',), left on the device: a
        step makes no host synchronisation."""
        runs = [self.runs[j] for j in js]
        x, mask = self._gather([(r.on_device["train"], rw, f) for r, rw, f in zip(runs, rows, firsts)], all_real)
        y = torch.stack([r.on_device["train"].labels[rw] for r, rw in zip(runs, rows)]).to(self.device)  # (R', B, 10)
        logits = self._logits(x, mask, self.idx(js), [r.dropout for r in runs])  # (R', B, 10)
        loss = Fn.binary_cross_entropy_with_logits(logits, y, reduction="none").mean((1, 2))  # (R',) each run's
        loss.sum().backward()  # runs share no parameter: each gets its own loss's gradient
        self._opt_step(js)
        return loss.detach()

    def train_epoch(self, epoch: int, progress: bool = False) -> list[float]:
        """One epoch of every run still in the group; each run's mean training loss."""
        B, W = self.cfg.batch_size, self.cfg.window
        self.model.train()
        plans = [r.data["train"].epoch_windows(B, W, r.gen) for r in self.runs]  # each ((n_j,), (n_j,)) on the CPU
        # Whether each window lies inside its trailer, known on the CPU: a step needs no device value.
        real = [r.data["train"].lengths[o] - f >= W for r, (o, f) in zip(self.runs, plans)]  # each (n_j,) bool
        where = self.runs[0].on_device["train"].device
        plans = [(o.to(where, non_blocking=True), f.to(where, non_blocking=True)) for o, f in plans]
        sizes = [len(o) for o, _ in plans]
        losses: list[list] = [[] for _ in self.runs]
        steps = range(0, max(sizes), B)
        for s in tqdm(steps, desc="train", unit="batch", leave=False, disable=not progress):
            by_size: dict[int, list[int]] = {}  # the last batch of an epoch differs between runs
            for j, n in enumerate(sizes):
                if s < n:
                    by_size.setdefault(min(B, n - s), []).append(j)
            for js in by_size.values():
                loss = self.step(js, [plans[j][0][s:s + B] for j in js], [plans[j][1][s:s + B] for j in js],
                                 all(bool(real[j][s:s + B].all()) for j in js))
                for j, lj in zip(js, loss):
                    losses[j].append((lj, min(B, sizes[j] - s)))
        out = []
        for r, run_losses, n_train in zip(self.runs, losses, sizes):
            step_loss = torch.stack([lj for lj, _ in run_losses]).cpu()  # (steps,)
            if not bool(torch.isfinite(step_loss).all()):
                step = int((~torch.isfinite(step_loss)).nonzero()[0, 0])
                raise diverged(r.desc, f"training loss is {float(step_loss[step])} at epoch {epoch}, step "
                                       f"{step + 1} of {len(run_losses)}")
            total = torch.zeros((), device=self.device)
            for lj, n in run_losses:  # summed as Trainer.train_epoch sums
                total += lj * n
            out.append(float(total) / n_train)
        return out

    @torch.no_grad()
    def evaluate(self, subset: str) -> list[tuple[float, dict[str, float], torch.Tensor]]:
        """Trainer.evaluate of each run on its own `subset` ("val" or "test"), batched over the runs."""
        cfg, E = self.cfg, self.cfg.eval_batch_size
        self.model.eval()
        snips = []
        for r in self.runs:
            if subset not in r.snippets:
                d = r.data[subset]
                owner, first = d.snippets(torch.arange(len(d)), cfg.window)  # (S,), (S,)
                where = r.on_device[subset].device  # sent once: every epoch evaluates the same snippets
                r.snippets[subset] = (owner, first, d.lengths[owner] - first >= cfg.window,
                                      owner.to(where, non_blocking=True), first.to(where, non_blocking=True))
            snips.append(r.snippets[subset])
        logits = [torch.empty(len(sn[0]), NUM_GENRES, device=self.device) for sn in snips]  # each (S_j, 10)
        # Snippets of each run per call. Where runs hand off (handoff.py): as many as the run alone
        # takes (eval_rows), a shorter last chunk padded with its last snippet, so that every call
        # computes C rows of each run whatever runs share it, and a run's logits are bit for bit
        # those it has in any group. Elsewhere: eval_batch_size in all, within the CPU's block.
        like = self.runs[0].on_device[subset]
        C = eval_rows(E, like, cfg.window) if self.hands_off else eval_rows(-(-E // len(self.runs)), like,
                                                                            cfg.window, len(self.runs))
        for s in range(0, max(len(sn[0]) for sn in snips), C):
            js = [j for j, sn in enumerate(snips) if s < len(sn[0])]
            size = C if self.hands_off else max(min(C, len(snips[j][0]) - s) for j in js)
            views = []
            for j in js:  # a shorter chunk repeats its last snippet: evaluation rows are independent
                owner, first = (t[s:s + C] for t in snips[j][3:])
                pad = size - len(owner)
                views.append((self.runs[j].on_device[subset], torch.cat([owner, owner[-1:].expand(pad)]),
                              torch.cat([first, first[-1:].expand(pad)])))
            x, mask = self._gather(views, all(bool(snips[j][2][s:s + C].all()) for j in js))
            if cfg.protocol != "masked":
                mask = None  # the authors' evaluation sees the zero padding as clips
            out = self._logits(x, mask, self.idx(js), None)  # (R', size, 10)
            for i, j in enumerate(js):
                n = min(C, len(snips[j][0]) - s)
                logits[j][s:s + n] = out[i, :n]
        results = []
        for r, (owner, *_), lg in zip(self.runs, snips, logits):
            d = r.data[subset]
            loss, p = snippet_loss(owner, lg.cpu(), d, cfg.protocol, cfg.batch_size, E)
            results.append(scored(d, loss, p))
        return results

    def _finish(self, r: _Run, t0: float) -> tuple[RunResult, torch.nn.Module, torch.Tensor, torch.Tensor]:
        """The run's best weights in a single head, evaluated on val and test as Trainer.fit ends."""
        c, dims = r.cfg, r.data["train"].dims()
        model = build_divita(dims.get("image"), dims.get("video"), temporal=c.temporal, fusion=c.fusion,
                             dropout=c.dropout, **head_options(c.protocol)).to(self.device)
        model.load_state_dict(r.best_state)
        _, val_m, val_p = evaluate_model(model, r.on_device["val"], c)
        _, test_m, test_p = evaluate_model(model, r.on_device["test"], c)
        result = RunResult(r.epochs.best_epoch, len(r.epochs.history), val_m, test_m, r.epochs.history,
                           time.perf_counter() - t0)
        return result, model, val_p, test_p

    def fit(self, progress: bool = True, desc: str = "group",
            on_finish: Callable[[int, _Run, tuple], None] | None = None,
            on_epoch: Callable[[int], None] | None = None,
            hand_off: Callable[[], bool] | None = None,
            on_hand_off: Callable[[int, RunState], None] | None = None) -> list[RunResult | None]:
        """Train until every run has stopped or been handed off; `on_finish(j, run, (result, model,
        val_probs, test_probs))` is called as run j (its position in `cfgs`) leaves the group,
        `on_epoch(epoch)` as each epoch starts. After each epoch, while two runs or more go on,
        `hand_off()` says whether one of them is to go to another process: the last is taken out
        (handoff.capture) and `on_hand_off(j, state)` gets it; its result here is None."""
        t0 = time.perf_counter() - self.seconds
        positions = list(range(len(self.runs)))  # each remaining run's position in cfgs
        results: list[RunResult | None] = [None] * len(self.runs)
        bar = tqdm(range(self.epoch + 1, max(r.cfg.max_epochs for r in self.runs) + 1), desc=desc, unit="epoch",
                   disable=not progress, leave=False)
        for epoch in bar:
            if on_epoch is not None:
                on_epoch(epoch)
            train_losses = self.train_epoch(epoch)
            stop = []
            for j, (r, tl, (val_loss, val_m, _)) in enumerate(zip(self.runs, train_losses, self.evaluate("val"))):
                lr = r.lr
                r.sched.step(val_loss)
                improved, done = r.epochs.add(epoch, tl, val_loss, val_m, lr, time.perf_counter() - t0)
                if improved:
                    r.best_state = self.model.run_state(j)
                if done or epoch >= r.cfg.max_epochs:
                    stop.append(j)
            bar.set_postfix(runs=len(self.runs), best=",".join(str(r.epochs.best_epoch) for r in self.runs))
            for j in stop:
                r = self.runs[j]
                out = self._finish(r, t0)
                results[positions[j]] = out[0]
                log_end(r.desc, out[0])
                if on_finish is not None:
                    on_finish(positions[j], r, out)
            if len(stop) < len(self.runs) - 1 and self.hands_off and hand_off is not None and hand_off():
                j = max(set(range(len(self.runs))) - set(stop))  # the last run going on
                state = handoff.capture(self, j, epoch, time.perf_counter() - t0)
                log.info("%s: handed to another process after epoch %d", self.runs[j].desc, epoch)
                stop.append(j)
                if on_hand_off is not None:
                    on_hand_off(positions[j], state)
            if stop:
                keep = [j for j in range(len(self.runs)) if j not in stop]
                if not keep:
                    break
                positions = [positions[j] for j in keep]
                self._keep(keep)
        return results

    def _keep(self, keep: list[int]) -> None:
        """Only runs `keep` (positions in self.runs) go on."""
        self.model.keep(torch.tensor(keep, device=self.device))
        self.runs = [self.runs[j] for j in keep]
        self._idx.clear()  # positions changed
        for i, r in enumerate(self.runs):  # the views follow the run's slice; optimiser state stays
            for v, p in zip(r.views, self.model.parameters()):
                v.data = run_slice(p.data, i)
