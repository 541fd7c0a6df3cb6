"""The authors' released files (Zenodo record 5716410): download, verify, unpack, import.

Layout under the data folder (what `t12k reproduce --data-dir` reads is at the top)::

    mtgc.csv                   labels and splits, md5-verified
    <stream>.h5                one cache per stream, imported from its archive
    released/manifest.json     files whose md5 was checked, stores unpacked from them
    released/<file>.part       a partial download; the next run resumes it (HTTP Range)
    released/<file>.bad        a complete download with a wrong md5, kept apart
    released/<file>            a verified archive, removed once its store is unpacked and imported
    released/<name>.zarr       an unpacked store (kept with keep_zarr or without import)

Every step ends with an atomic rename, so a file under its final name is always a good one,
and every step is skipped when its result is already there. Downloads and unpacking are
bounded by the release's size caps (paper.RELEASED_MAX_BYTES, UNPACK_RATIO) times
`max_size_factor`, so a wrong or hostile server cannot fill the disk. The transfer of one
file (resume, retries, size bound) and its md5 check are in transfer.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from trailers12k_feats import paper
from trailers12k_feats.cache import check_dtype, read_attrs, stream_path
from trailers12k_feats.paper import (
    RELEASE_URL,
    RELEASED_MAX_BYTES,
    RELEASED_MD5,
    STREAMS,
)
from trailers12k_feats.sources.transfer import fetch, md5sum, verify
from trailers12k_feats.sources.unpack import unpack_store
from trailers12k_feats.sources.zarr_import import ImportConfig, import_zarr, zarr_module
from trailers12k_feats.utils import T12kError, write_json

log = logging.getLogger(__name__)

SUBDIR = "released"
ARCHIVE_SUFFIX = ".tar.gz"


@dataclass(frozen=True)
class ReleasedFile:
    """One file of the release: its name, md5, the stream an archive holds (None: the metadata),
    and the most bytes it can have (None: unbounded)."""

    file: str
    md5: str
    stream: str | None = None
    max_bytes: int | None = None

    @property
    def key(self) -> str:
        return self.stream or "mtgc"


def released_files() -> tuple[ReleasedFile, ...]:
    """The registry, from paper.RELEASED_MD5 and paper.STREAMS (one source of truth)."""
    stream_of = {s.released: s.name for s in STREAMS.values()}
    return tuple(ReleasedFile(f, md5, stream_of.get(f), RELEASED_MAX_BYTES.get(f)) for f, md5 in RELEASED_MD5.items())


@dataclass(frozen=True)
class DownloadConfig:
    """What to fetch, from where, and what to do with it once verified."""

    data_dir: Path = Path("cache")
    only: tuple[str, ...] = ()  # keys (mtgc, stream names) or file names; empty: everything
    base_url: str = RELEASE_URL  # "{file}" is replaced by the file name, else the name is appended
    files: tuple[ReleasedFile, ...] = field(default_factory=released_files)
    import_caches: bool = True  # import each store into <data_dir>/<stream>.h5
    keep_zarr: bool = False  # keep the unpacked store after a successful import
    dtype: str = "float16"  # dtype of the imported caches
    timeout: float = 60.0  # seconds without data before a connection counts as failed
    retries: int = 3  # further attempts after a failed connection or transfer, each resuming
    retry_wait: float = 2.0  # seconds before the first retry, doubled each time
    chunk_bytes: int = 1 << 20
    max_size_factor: float = 1.0  # multiplies the size bounds of downloads and unpacking (mirrors that repackage)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        url = urlsplit(self.base_url.replace("{file}", "f"))
        if url.scheme not in ("http", "https") or not url.netloc:
            raise T12kError(f"base URL {self.base_url!r} must be an http:// or https:// address such as "
                            f"{RELEASE_URL}; fix --base-url.")
        if self.timeout <= 0:
            raise T12kError(f"timeout must be a positive number of seconds, got {self.timeout}; fix --timeout.")
        if self.retries < 0 or self.retry_wait < 0:
            raise T12kError(f"retries ({self.retries}) and retry wait ({self.retry_wait} s) must not be negative; "
                            f"fix --retries.")
        if self.chunk_bytes <= 0:
            raise T12kError(f"chunk size must be positive, got {self.chunk_bytes}.")
        if not self.max_size_factor >= 1:
            raise T12kError(f"max size factor must be at least 1 (it only loosens the release's size bounds), got "
                            f"{self.max_size_factor}; fix --max-size-factor.")
        check_dtype(self.dtype)
        for f in self.files:
            if not re.fullmatch(r"[0-9a-f]{32}", f.md5):
                raise T12kError(f"md5 of {f.file} must be 32 lowercase hex digits, got {f.md5!r}.")
        names = {n: f.key for f in self.files for n in (f.key, f.file, f.file.removesuffix(ARCHIVE_SUFFIX))}
        bad = [n for n in self.only if n not in names]
        if bad:
            raise T12kError(f"unknown released file {bad[0]!r}; valid names: "
                            f"{', '.join(f.key for f in self.files)} (or their file names).")
        object.__setattr__(self, "only", tuple(dict.fromkeys(names[n] for n in self.only)))

    @property
    def download_dir(self) -> Path:
        return self.data_dir / SUBDIR

    def selected(self) -> list[ReleasedFile]:
        return [f for f in self.files if not self.only or f.key in self.only]

    def max_bytes(self, f: ReleasedFile) -> int | None:
        """The most bytes a download of `f` may have (None: no bound)."""
        return int(f.max_bytes * self.max_size_factor) if f.max_bytes is not None else None

    def max_unpacked(self, archive_bytes: int) -> int:
        """The most bytes unpacking an archive of `archive_bytes` may write."""
        return int(max(archive_bytes * paper.UNPACK_RATIO, paper.UNPACK_FLOOR_BYTES) * self.max_size_factor)

    def url(self, f: ReleasedFile) -> str:
        name = quote(f.file)
        if "{file}" in self.base_url:
            return self.base_url.replace("{file}", name)
        return self.base_url.rstrip("/") + "/" + name


class Manifest:
    """released/manifest.json: which files passed their md5 (by size and mtime) and what was unpacked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            self.data = data
        else:
            log.warning("%s is unreadable; files will be checked again", path)  # it only saves work

    def verified(self, f: ReleasedFile, path: Path) -> bool:
        e = self.data.get(f.file, {})
        st = path.stat()
        return e.get("md5") == f.md5 and e.get("size") == st.st_size and e.get("mtime_ns") == st.st_mtime_ns

    def set_verified(self, f: ReleasedFile, path: Path) -> None:
        st = path.stat()
        if self.data.get(f.file, {}).get("md5") != f.md5:  # what was recorded under another md5 is void
            self.data[f.file] = {}
        self.data.setdefault(f.file, {}).update(md5=f.md5, size=st.st_size, mtime_ns=st.st_mtime_ns)
        write_json(self.path, self.data)

    def unpacked(self, f: ReleasedFile, zdir: Path) -> bool:
        e = self.data.get(f.file, {})
        return e.get("md5") == f.md5 and e.get("unpacked") == zdir.name

    def set_unpacked(self, f: ReleasedFile, zdir: Path) -> None:
        if self.data.get(f.file, {}).get("md5") != f.md5:
            self.data[f.file] = {"md5": f.md5}
        self.data[f.file]["unpacked"] = zdir.name
        write_json(self.path, self.data)


def provenance(zdir: str | os.PathLike) -> dict[str, str]:
    """The archive and md5 a store was unpacked from, when `t12k download` unpacked it."""
    zdir = Path(zdir)
    data = Manifest(zdir.parent / "manifest.json").data
    for file, e in data.items():
        if isinstance(e, dict) and e.get("unpacked") == zdir.name and "md5" in e:
            return {"archive": file, "md5": e["md5"]}
    return {}


def _fetch_verified(cfg: DownloadConfig, f: ReleasedFile, manifest: Manifest, progress: bool) -> Path:
    """The verified file `released/<file>`, downloading it if needed."""
    final = cfg.download_dir / f.file
    if final.exists():
        if not manifest.verified(f, final):  # e.g. placed there by hand: check it once
            verify(final, f, progress)
            manifest.set_verified(f, final)
        return final
    part = final.with_name(f.file + ".part")
    fetch(cfg, f, part, progress)
    verify(part, f, progress)
    os.replace(part, final)
    manifest.set_verified(f, final)
    log.info("%s: downloaded, md5 ok", f.file)
    return final


def _imported(h5: Path, f: ReleasedFile) -> bool:
    """Whether `h5` is a cache imported from exactly this archive (its md5 is in the provenance)."""
    try:
        return h5.exists() and read_attrs(h5).config.get("md5") == f.md5
    except T12kError:
        return False


def _store_dir(cfg: DownloadConfig, f: ReleasedFile) -> Path:
    return cfg.download_dir / f.file.removesuffix(ARCHIVE_SUFFIX)


def _check_targets(cfg: DownloadConfig, files: list[ReleasedFile], manifest: Manifest) -> None:
    """Before any transfer: refuse to overwrite or use files that did not come from the release."""
    for f in files:
        if f.stream is None:
            target = cfg.data_dir / f.file
            if target.exists() and md5sum(target, progress=False) != f.md5:
                raise T12kError(f"{target} exists but is not the released {f.file} (another md5); move it away or "
                                f"choose another --data-dir.")
            continue
        h5 = stream_path(cfg.data_dir, f.stream)
        if cfg.import_caches and h5.exists() and not _imported(h5, f):
            raise T12kError(f"cache {h5} exists but was not imported from {f.file}; move it away or choose another "
                            f"--data-dir.")
        zdir = _store_dir(cfg, f)
        if zdir.exists() and not manifest.unpacked(f, zdir):
            raise T12kError(f"{zdir} exists but was not unpacked from the verified {f.file}; delete it (or import it "
                            f"yourself with `t12k import-zarr`).")


def _remove_tree(path: Path) -> None:
    """Delete a folder so that no half-deleted copy is ever left under its name."""
    if path.exists():
        tmp = path.with_name(f".{path.name}.del-{os.getpid()}")
        os.replace(path, tmp)
        shutil.rmtree(tmp)


def _sweep(folder: Path) -> None:
    """Remove what killed runs left: hidden temporary folders of unpacking and deleting."""
    for p in folder.glob(".*.zarr.*-*"):
        if p.is_dir() and (".tmp-" in p.name or ".del-" in p.name):
            log.info("removing %s, left by an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True)


def _get_metadata(cfg: DownloadConfig, f: ReleasedFile, manifest: Manifest, progress: bool) -> str:
    target = cfg.data_dir / f.file
    if target.exists():  # _check_targets made sure it is the released file
        return "already there, md5 ok"
    os.replace(_fetch_verified(cfg, f, manifest, progress), target)
    return f"downloaded to {target}, md5 ok"


def _get_archive(cfg: DownloadConfig, f: ReleasedFile, manifest: Manifest, progress: bool) -> str:
    h5 = stream_path(cfg.data_dir, f.stream)
    archive, zdir = cfg.download_dir / f.file, _store_dir(cfg, f)
    if cfg.import_caches and _imported(h5, f):
        archive.unlink(missing_ok=True)
        return f"already imported to {h5}"
    fresh = not zdir.exists()
    if fresh:
        archive = _fetch_verified(cfg, f, manifest, progress)
        unpack_store(archive, zdir, progress, max_bytes=cfg.max_unpacked(archive.stat().st_size))
        manifest.set_unpacked(f, zdir)
    if not cfg.import_caches:
        archive.unlink(missing_ok=True)  # the store is complete and has its group: the archive is not needed
        return f"unpacked to {zdir}" if fresh else f"already unpacked to {zdir}"
    import_zarr(ImportConfig(zdir, out=h5, name=f.stream, dtype=cfg.dtype, overwrite=True,
                             provenance={"archive": f.file, "md5": f.md5, "url": cfg.url(f)}), progress)
    archive.unlink(missing_ok=True)
    if not cfg.keep_zarr:
        _remove_tree(zdir)
    return f"imported to {h5}"


def download(cfg: DownloadConfig, progress: bool = True) -> list[tuple[str, str]]:
    """Fetch, verify, unpack and import the selected files; return (file, what happened) for each."""
    files = cfg.selected()
    cfg.download_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(cfg.download_dir / "manifest.json")
    if cfg.import_caches and any(f.stream for f in files):
        zarr_module()  # fail now, not after hours of transfer
    _check_targets(cfg, files, manifest)
    _sweep(cfg.download_dir)
    done = []
    for f in files:
        what = _get_metadata(cfg, f, manifest, progress) if f.stream is None else \
            _get_archive(cfg, f, manifest, progress)
        log.info("%s: %s", f.file, what)
        done.append((f.file, what))
    return done
