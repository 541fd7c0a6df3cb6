"""Metadata (`mtgc.csv`), alignment with feature caches, and window/snippet batching.

Training examples are random windows of `window` consecutive clips; evaluation cuts each
trailer into consecutive non-overlapping snippets of `window` clips, the last one padded
(docs/paper.md). Everything is gathered with vectorised indexing from in-RAM tensors.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from trailers12k_feats import GENRES, NUM_GENRES
from trailers12k_feats.cache import FeatureSet
from trailers12k_feats.utils import T12kError, atomic_path

log = logging.getLogger(__name__)

SPLITS = (0, 1, 2)  # the split columns of mtgc.csv
SPLIT_COLUMNS = ("split0", "split1", "split2")
SUBSETS = {"train": 0, "val": 1, "test": 2}
HEADER = ("mid", *GENRES, *SPLIT_COLUMNS)


def check_splits(splits: Iterable[int]) -> tuple[int, ...]:
    """`splits` as a tuple; stop if it is empty or holds a split that mtgc.csv does not have."""
    splits = tuple(splits)
    if not splits:
        raise T12kError(f"select at least one split among {', '.join(map(str, SPLITS))}.")
    bad = [s for s in splits if s not in SPLITS or isinstance(s, bool)]
    if bad:
        raise T12kError(f"split must be {', '.join(map(str, SPLITS[:-1]))} or {SPLITS[-1]}, "
                        f"got {', '.join(map(repr, bad))}.")
    return splits


@dataclass
class Metadata:
    """Labels and split assignments of every trailer, in file order."""

    path: Path
    ids: list[str]
    labels: np.ndarray  # (n, 10) uint8
    splits: np.ndarray  # (n, 3) int8, 0 train / 1 val / 2 test

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, split: int, name: str) -> np.ndarray:
        """Row indices of `name` ("train", "val" or "test") in split `split`."""
        check_splits([split])
        rows = np.flatnonzero(self.splits[:, split] == SUBSETS[name])
        if len(rows) == 0:
            raise T12kError(f"{self.path}: the {name} set of split{split} is empty; every split column "
                            f"needs train (0), val (1) and test (2) rows.")
        return rows

    def check_splits(self, splits: Sequence[int]) -> None:
        """Stop with a clear error if any of `splits` has an empty train, val or test set."""
        for split in splits:
            for name in SUBSETS:
                self.subset(split, name)


def load_metadata(path: str | os.PathLike) -> Metadata:
    """Read and validate `mtgc.csv`: mid, the 10 genres in order, split0..split2."""
    path = Path(path)
    if not path.is_file():
        raise T12kError(f"metadata file {path} does not exist; pass the path of mtgc.csv "
                        f"(or run `t12k synth` for a synthetic corpus).")
    import io

    try:  # utf-8-sig: a byte order mark (Excel's "CSV UTF-8") is dropped instead of sticking to "mid"
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise T12kError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as "
                        f"UTF-8 (ids and the header are plain ASCII in the released mtgc.csv).") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        header = tuple(h.strip() for h in next(reader, ()))
        if header != HEADER:
            got = ",".join(header)
            if not got.isprintable():  # characters one cannot see (zero-width spaces...): show them escaped
                got = ascii(got)
            raise T12kError(f"{path}, line 1: the header must be {','.join(HEADER)} (genres in this order), "
                            f"got {got or 'an empty file'}.")
        ids: list[str] = []
        rows: list[list[int]] = []
        seen: dict[str, int] = {}
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(HEADER):
                raise T12kError(f"{path}, line {lineno}: expected {len(HEADER)} columns, got {len(row)}.")
            mid = row[0].strip()
            if not mid:
                raise T12kError(f"{path}, line {lineno}: empty trailer id in column mid.")
            if mid in seen:
                raise T12kError(f"{path}, line {lineno}: trailer {mid} already appears on line {seen[mid]}.")
            seen[mid] = lineno
            values = []
            for col, cell in zip(HEADER[1:], row[1:]):
                allowed = ("0", "1", "2") if col.startswith("split") else ("0", "1")
                cell = cell.strip()
                if cell not in allowed:
                    raise T12kError(f"{path}, line {lineno}: column {col} of {mid} must be one of "
                                    f"{'/'.join(allowed)}, got {cell!r}.")
                values.append(int(cell))
            if not any(values[:NUM_GENRES]):
                raise T12kError(f"{path}, line {lineno}: trailer {mid} has no genre; every trailer needs at least one.")
            ids.append(mid)
            rows.append(values)
    if not ids:
        raise T12kError(f"{path} has a header but no trailers.")
    arr = np.asarray(rows, np.int64)
    return Metadata(path, ids, arr[:, :NUM_GENRES].astype(np.uint8), arr[:, NUM_GENRES:].astype(np.int8))


def write_metadata(path: str | os.PathLike, ids: Sequence[str], labels: np.ndarray, splits: np.ndarray) -> None:
    """Write a metadata file in the `mtgc.csv` format (atomically)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for tid, lab, spl in zip(ids, labels, splits):
            w.writerow([tid, *map(int, lab), *map(int, spl)])


def align(meta: Metadata, sets: Sequence[FeatureSet], on_missing: str = "error") -> np.ndarray:
    """Metadata rows present in every feature set; report what is missing either way.

    `on_missing` is "error" (stop on any trailer in the metadata but missing from a cache)
    or "warn" (log it and drop those trailers). Trailers in a cache but not in the
    metadata are always reported and never used.
    """
    if on_missing not in ("error", "warn"):
        raise T12kError(f"on_missing must be 'error' or 'warn', got {on_missing!r}.")
    keep = np.ones(len(meta), bool)
    meta_ids = set(meta.ids)
    for fs in sets:
        present = np.fromiter((tid in fs.index for tid in meta.ids), bool, len(meta))
        missing = [meta.ids[i] for i in np.flatnonzero(~present)]
        extra = [tid for tid in fs.ids if tid not in meta_ids]
        if extra:
            log.warning("%s: %d trailers are not in %s and are ignored (e.g. %s)", fs.path, len(extra),
                        meta.path, ", ".join(extra[:3]))
        if missing:
            msg = (f"{len(missing)} of {len(meta)} trailers in {meta.path} are missing from cache {fs.path} "
                   f"(e.g. {', '.join(missing[:3])})")
            if on_missing == "error":
                raise T12kError(msg + "; extract them, or pass --on-missing warn to drop them.")
            log.warning("%s; dropping them", msg)
        keep &= present
    if not keep.any():
        raise T12kError(f"no trailer of {meta.path} is in every cache; check that the caches belong to this metadata.")
    return np.flatnonzero(keep)


@dataclass
class Batch:
    x: dict[str, torch.Tensor]  # stream -> (B, W, F)
    mask: torch.Tensor  # (B, W) bool, True = real clip
    y: torch.Tensor | None  # (B, 10) float; None when the trailers have no labels (prediction)
    rows: torch.Tensor  # (B,) index into the TrailerData (for snippets: owning trailer)


class TrailerData:
    """Trailers of one or more streams held in RAM, with their genre labels when known.

    `labels` (n, 10) are needed to train and evaluate; without them (new videos) batches
    carry `y=None` and only predictions can be made. With several streams a trailer's
    length is the smallest of its streams' clip counts, and both streams are indexed at the
    same clip positions, so a window covers the same stretch of the trailer in each (clip
    counts agree when the streams share clip settings).
    """

    def __init__(self, ids: Sequence[str], sets: dict[str, FeatureSet], labels: np.ndarray | None = None) -> None:
        if not sets:
            raise T12kError("at least one feature stream is required.")
        self.ids = list(ids)
        self.labels: torch.Tensor | None = None  # (n, 10) float
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(self.ids), NUM_GENRES):
                raise T12kError(f"labels must have shape ({len(self.ids)}, {NUM_GENRES}) (one row of genres per "
                                f"trailer), got {labels.shape}.")
            self.labels = torch.from_numpy(labels.astype(np.float32))
        self.streams = list(sets)
        self.features = {k: fs.features for k, fs in sets.items()}
        starts, lengths = {}, []
        for k, fs in sets.items():
            missing = [t for t in self.ids if t not in fs.index]
            if missing:
                raise T12kError(f"{len(missing)} trailers are not in cache {fs.path} (e.g. {', '.join(missing[:3])}); "
                                f"select trailers that every stream holds (see align).")
            pos = torch.as_tensor([fs.index[t] for t in self.ids], dtype=torch.long)  # (n,)
            starts[k] = fs.offsets[pos]  # (n,)
            lengths.append(fs.offsets[pos + 1] - fs.offsets[pos])
        self.starts = starts
        self.lengths = torch.stack(lengths).min(0).values  # (n,)
        if len(lengths) > 1 and not bool((lengths[0] == lengths[1]).all()):
            n = int((lengths[0] != lengths[1]).sum())
            log.info("%d trailers have different clip counts across streams; using the shorter", n)

    @classmethod
    def from_metadata(cls, meta: Metadata, sets: dict[str, FeatureSet], rows: np.ndarray) -> TrailerData:
        """The trailers at metadata rows `rows` (e.g. from :func:`align`), labelled from the metadata."""
        return cls([meta.ids[i] for i in rows], sets, meta.labels[rows])

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, keep: torch.Tensor) -> TrailerData:
        """The trailers at positions `keep` (indices or a bool mask), in that order, sharing the features."""
        idx = torch.arange(len(self))[keep]  # (m,)
        out = copy.copy(self)
        out.ids = [self.ids[i] for i in idx.tolist()]
        out.labels = None if self.labels is None else self.labels[idx]
        out.starts = {k: v[idx] for k, v in self.starts.items()}
        out.lengths = self.lengths[idx]
        return out

    def dims(self) -> dict[str, int]:
        return {k: int(v.shape[1]) for k, v in self.features.items()}

    @property
    def device(self) -> torch.device:
        """Where the features (and so the batches gathered from them) live."""
        return next(iter(self.features.values())).device

    def to(self, device: torch.device | str, moved: dict[int, tuple] | None = None) -> TrailerData:
        """A copy whose features, clip positions and labels live on `device`. Each feature tensor
        is copied once: pass one `moved` dict to TrailerData that share features (the train, val
        and test sets of a split, the runs of a group) so their copies share it too."""
        device = torch.device(device)
        moved = {} if moved is None else moved
        out = copy.copy(self)
        out.features = {}
        for k, f in self.features.items():
            if id(f) not in moved:  # the source is kept beside its copy so its id stays its own
                moved[id(f)] = (f, f.to(device))
            out.features[k] = moved[id(f)][1]
        out.starts = {k: v.to(device) for k, v in self.starts.items()}
        out.lengths = self.lengths.to(device)
        out.labels = None if self.labels is None else self.labels.to(device)
        return out

    def clip_index(self, rows: torch.Tensor, first: torch.Tensor,
                   window: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Where clips first..first+window-1 of trailers `rows` lie in each stream's features
        ({stream: (B, W)}, past a trailer's end its last clip), and the mask of real clips (B, W).
        `rows` and `first` live where the features do."""
        pos = first[:, None] + torch.arange(window, device=first.device)  # (B, W)
        mask = pos < self.lengths[rows, None]  # (B, W)
        pos = torch.minimum(pos, self.lengths[rows, None] - 1)  # stay inside the trailer
        return {k: self.starts[k][rows, None] + pos for k in self.streams}, mask

    def gather(self, rows: torch.Tensor, first: torch.Tensor, window: int, dtype: torch.dtype) -> Batch:
        """Clips first..first+window-1 of trailers `rows`, padded with zeros past each end."""
        idx, mask = self.clip_index(rows, first, window)  # {k: (B, W)}, (B, W)
        x = {}
        for k in self.streams:
            # index_select copies whole rows: several times faster than indexing with the (B, W) tensor
            xk = self.features[k].index_select(0, idx[k].reshape(-1)).view(*idx[k].shape, -1).to(dtype)  # (B, W, F)
            x[k] = xk.masked_fill_(~mask[..., None], 0.0)
        return Batch(x, mask, None if self.labels is None else self.labels[rows], rows)

    def window_starts(self, rows: torch.Tensor, window: int, gen: torch.Generator) -> torch.Tensor:
        """The first clip of one random window of `window` clips per trailer (B,), drawn from `gen`."""
        slack = (self.lengths[rows] - window).clamp(min=0) + 1  # (B,) number of valid starts
        return (torch.rand(len(rows), generator=gen) * slack).long()  # (B,)

    def random_windows(self, rows: torch.Tensor, window: int, gen: torch.Generator,
                       dtype: torch.dtype = torch.float32) -> Batch:
        """One random window of `window` consecutive clips per trailer (shorter trailers: all clips)."""
        return self.gather(rows, self.window_starts(rows, window, gen), window, dtype)

    def epoch_windows(self, batch_size: int, window: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """An epoch's (order (n,), first clip (n,)): a shuffle, then one random window per trailer
        drawn batch by batch, the draws `random_windows` makes over `order` in batches of
        `batch_size`. Made on the CPU, so a device only receives the two tensors once an epoch."""
        order = torch.randperm(len(self), generator=gen)  # (n,)
        firsts = [self.window_starts(order[s:s + batch_size], window, gen) for s in range(0, len(self), batch_size)]
        return order, torch.cat(firsts)  # (n,), (n,)

    def snippets(self, rows: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(owner, first clip) of every non-overlapping `window`-clip snippet of trailers `rows`."""
        count = (self.lengths[rows] + window - 1) // window  # (n,)
        owner = torch.repeat_interleave(rows, count)  # (total,)
        base = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        first = (torch.arange(len(owner), device=owner.device) - base) * window  # (total,)
        return owner, first


DEVICE_SHARE = 0.75  # of a GPU's free memory the features may take; the rest is for the heads' activations


def to_device(datas: Sequence[dict[str, TrailerData]], device: torch.device | str,
              desc: str = "training") -> list[dict[str, TrailerData]]:
    """`datas` (each {"train", "val", "test"} or any subsets) with their features on `device` when
    they fit in DEVICE_SHARE of its free memory: one copy per feature tensor, shared by every
    subset, so windows and snippets are then gathered on the device and a step copies nothing.
    When they do not fit, `datas` as they are, with a log line: batches are gathered in host RAM
    and copied to the device at each step. On the CPU, `datas` as they are."""
    device = torch.device(device)
    if device.type == "cpu":
        return list(datas)
    tensors = {id(f): f for data in datas for d in data.values() for f in d.features.values()}
    need = sum(f.numel() * f.element_size() for f in tensors.values())
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else need
    if need > DEVICE_SHARE * free:
        log.info("%s: the features (%.2f GiB) do not fit in %.0f%% of the %.2f GiB free on %s; batches are "
                 "gathered in host RAM and copied at each step", desc, need / 2**30, 100 * DEVICE_SHARE,
                 free / 2**30, device)
        return list(datas)
    moved: dict[int, tuple] = {}
    out = [{k: d.to(device, moved) for k, d in data.items()} for data in datas]
    log.info("%s: features moved to %s once (%.2f GiB); batches are gathered there", desc, device, need / 2**30)
    return out


def centred_table(features: torch.Tensor, dtype: torch.dtype, chunk_rows: int = 1024,
                  sample: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(features - offset in `dtype` (N, F), offset (F,) float32), the offset being the mean of
    an even sample of about `sample` clips (all of them when fewer): the mean clip, near enough.

    A head in bf16 reads its clips centred (BatchNorm subtracts their mean first): kept so, a
    batch is gathered straight into the matmul's dtype with no pass to convert and centre it,
    and rounding to bf16 loses no more than rounding the batch-centred clips does. Made chunk
    by chunk (small enough to stay in cache), so the extra memory is the table itself."""
    every = max(1, len(features) // sample)
    picked = features[::every]  # (n, F) a view: every `every`-th clip
    offset = (picked.sum(0, dtype=torch.float32) / max(1, len(picked))).float()  # (F,)
    table = torch.empty(features.shape, dtype=dtype, device=features.device)  # (N, F)
    for s in range(0, len(features), chunk_rows):
        table[s:s + chunk_rows].copy_(features[s:s + chunk_rows].float() - offset)  # not in place: float32 features are the caller's
    return table, offset
