"""One released file over HTTP for `t12k download` (download.py): resumed with Range requests,
retried with growing waits, bounded by the file's size cap, then md5-checked."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from trailers12k_feats import __version__
from trailers12k_feats.utils import T12kError

if TYPE_CHECKING:  # download.py imports this module
    from trailers12k_feats.sources.download import DownloadConfig, ReleasedFile

log = logging.getLogger(__name__)


def md5sum(path: Path, progress: bool = True) -> str:
    """The md5 hex digest of `path`, read in 4 MiB blocks."""
    h = hashlib.md5()
    with open(path, "rb") as fh, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                      desc=f"md5 {path.name}", disable=not progress) as bar:
        while block := fh.read(1 << 22):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


class _Retry(Exception):
    """A failure worth another attempt (network, truncated transfer); the partial file is kept."""


def _too_big(cfg: DownloadConfig, what: str) -> T12kError:
    return T12kError(f"{what}; it is not the released file: check --base-url, or pass --max-size-factor N "
                     f"(> {cfg.max_size_factor:g}) for a mirror that repackages the files.")


def _http_get(cfg: DownloadConfig, f: ReleasedFile, url: str, part: Path, progress: bool) -> None:
    """One attempt: fetch `url` into `part`, resuming from its current size, within `f`'s size bound."""
    have = part.stat().st_size if part.exists() else 0
    limit = cfg.max_bytes(f)
    if limit is not None and have > limit:
        raise T12kError(f"{part} already holds {have} bytes, more than the released {f.file} can be ({limit} bytes); "
                        f"delete it and run `t12k download` again (with --max-size-factor N for a mirror that "
                        f"repackages the files).")
    headers = {"User-Agent": f"trailers12k_feats/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=cfg.timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is complete, or longer than the file
            m = re.match(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
            if m and int(m[1]) == have:
                return
            part.unlink()
            raise _Retry("the server refused to resume the partial file, starting over") from None
        if e.code in (408, 429) or e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        raise T12kError(f"{url} answered HTTP {e.code} ({e.reason}); check --base-url (it must serve the files of "
                        f"Zenodo record 5716410).") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Retry(str(getattr(e, "reason", e))) from None
    with resp:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m[1]) != have:
                part.unlink()
                raise _Retry("the server resumed at another offset, starting over")
            total = int(m[2]) if m[2] != "*" else None
        else:
            if have:
                log.info("%s: the server does not resume downloads; starting over", url)
            have = 0
            total = int(length) if length else None
        if total is not None and limit is not None and total > limit:  # refused before a byte is written
            raise _too_big(cfg, f"{url} announces {total} bytes for {f.file}, more than the released file can be "
                                f"({limit} bytes); nothing was downloaded")
        if total is not None:
            free = shutil.disk_usage(part.parent).free
            if total - have > free:
                raise T12kError(f"{part.name} needs {(total - have) / 1e9:.1f} GB more but {part.parent} has "
                                f"{free / 1e9:.1f} GB free; free some space and run `t12k download` again.")
        with open(part, "ab" if have else "wb") as out, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=part.name.removesuffix(".part"), disable=not progress) as bar:
            size = have
            try:
                while block := resp.read(cfg.chunk_bytes):
                    if limit is not None and size + len(block) > limit:  # no length announced, or a server that lies
                        break
                    out.write(block)
                    size += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:
                raise _Retry(f"the transfer broke off ({e})") from None
        if block:
            part.unlink()
            raise _too_big(cfg, f"{url} sent more than {limit} bytes for {f.file}, the most the released file can be; "
                                f"the partial download was deleted")
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Retry(f"the transfer stopped at {size} of {total} bytes")


def fetch(cfg: DownloadConfig, f: ReleasedFile, part: Path, progress: bool = True) -> None:
    """Download one file into `part`, retrying and resuming; the part file is never deleted on failure."""
    url = cfg.url(f)
    for attempt in range(cfg.retries + 1):
        try:
            _http_get(cfg, f, url, part, progress)
            return
        except _Retry as e:
            if attempt == cfg.retries:
                have = part.stat().st_size if part.exists() else 0
                todo = (f"{part} keeps the {have} bytes received: run `t12k download` again to resume." if have
                        else "check the network and --base-url, then run `t12k download` again.")
                raise T12kError(f"downloading {f.file} from {url} failed after {attempt + 1} attempts ({e}); {todo}")
            wait = cfg.retry_wait * 2 ** attempt
            log.warning("%s: %s; retrying in %.0f s", f.file, e, wait)
            time.sleep(wait)


def verify(path: Path, f: ReleasedFile, progress: bool = True) -> None:
    """Check the md5 of `path`; on a mismatch move it to `<file>.bad` and raise."""
    got = md5sum(path, progress)
    if got != f.md5:
        bad = path.with_name(f.file + ".bad")
        os.replace(path, bad)
        raise T12kError(f"{f.file} has md5 {got}, expected {f.md5}: the file is corrupt or not the released one "
                        f"and was moved to {bad}; delete it and run `t12k download` again (check --base-url if it "
                        f"happens again).")
