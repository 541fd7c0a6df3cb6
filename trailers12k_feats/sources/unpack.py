"""Safe unpacking of a release archive (tar.gz) into a folder.

No member may land outside the target folder: absolute names, `..`, links that point out
(or are written through), devices and fifos are refused before anything is written, and
extraction uses tarfile's "data" filter on top. The total size of the members is bounded
(`max_bytes`, checked from each member's header before it is written), so an archive that
would unpack to far more than it could hold (a "zip bomb") stops early. The archive is
unpacked into a temporary sibling and renamed into place only when every member is out, so
a store under its final name is always complete.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)

# tarfile's extraction filters exist from Python 3.11.4 on; before that only check_member guards.
_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
_FilterError = getattr(tarfile, "FilterError", ())


def _inside(rel: str) -> bool:
    """Whether a relative POSIX path stays inside its root once `..` are resolved."""
    norm = posixpath.normpath(rel)
    return not (posixpath.isabs(norm) or norm == ".." or norm.startswith("../"))


def check_member(m: tarfile.TarInfo, links: set[str], archive: Path) -> None:
    """Refuse a member that could write outside the target folder."""
    def unsafe(why: str) -> T12kError:
        return T12kError(f"{archive} is unsafe: {why}; nothing was unpacked. Delete the archive and download it "
                         f"again from a trusted source.")

    name = m.name.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in path.parts:
        raise unsafe(f"member {m.name!r} has an absolute path or '..'")
    parents = {str(p) for p in path.parents}
    if parents & links:  # a file written through a link could land wherever the link points
        raise unsafe(f"member {m.name!r} is written through the link {sorted(parents & links)[0]!r}")
    if m.issym() or m.islnk():
        target = m.linkname.replace("\\", "/")
        # A symlink is resolved from its own folder, a hard link from the archive's root.
        rel = posixpath.join(str(path.parent), target) if m.issym() else target
        if posixpath.isabs(target) or not _inside(rel):
            raise unsafe(f"link {m.name!r} points outside the target folder ({m.linkname!r})")
        links.add(str(path))
    elif not (m.isfile() or m.isdir()):
        raise unsafe(f"member {m.name!r} is a device, fifo or other special file")


class _Counted:
    """A file object that reports bytes read to a progress bar (the compressed archive)."""

    def __init__(self, fh: BinaryIO, bar: tqdm) -> None:
        self.fh, self.bar = fh, bar

    def read(self, n: int = -1) -> bytes:
        block = self.fh.read(n)
        self.bar.update(len(block))
        return block


def find_group(root: Path, name: str) -> Path | None:
    """The zarr group in an unpacked archive: the root itself, `root/name`, or its only folder."""
    for cand in (root, root / name):
        if (cand / ".zgroup").is_file():
            return cand
    dirs = [p for p in root.iterdir() if p.is_dir()]
    if len(dirs) == 1 and (dirs[0] / ".zgroup").is_file():
        return dirs[0]
    return None


def unpack_store(archive: Path, dest: Path, progress: bool = True, max_bytes: int | None = None) -> Path:
    """Unpack the zarr store in `archive` to the folder `dest` (which must not exist); return `dest`.

    With `max_bytes`, the members may hold that many bytes in all; more stops the unpacking
    and removes what was written.
    """
    if dest.exists():
        raise T12kError(f"{dest} already exists; delete it before unpacking {archive.name} again.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    links: set[str] = set()
    total = 0  # bytes of the members so far, as their headers say
    try:
        with open(archive, "rb") as fh, \
                tqdm(total=archive.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=f"unpack {archive.name}", disable=not progress) as bar:
            # Stream mode reads the archive once, front to back, however large it is.
            with tarfile.open(fileobj=_Counted(fh, bar), mode="r|*") as tar:
                for m in tar:
                    check_member(m, links, archive)
                    total += m.size if m.isfile() else 0
                    if max_bytes is not None and total > max_bytes:
                        raise T12kError(
                            f"{archive} unpacks to more than {max_bytes} bytes (at member {m.name!r}), more than a "
                            f"released store of an archive this size can be; nothing was kept. It is not a released "
                            f"feature archive: delete it and download it again (or pass --max-size-factor N to "
                            f"`t12k download` for a mirror that repackages the files).")
                    tar.extract(m, tmp, **_FILTER)
        group = find_group(tmp, dest.name)
        if group is None:
            raise T12kError(f"{archive} holds no zarr group (.zgroup) at its top level or in {dest.name}/; it is "
                            f"not a released feature archive.")
        os.replace(group, dest)
    except _FilterError as e:  # what the "data" filter caught beyond check_member
        raise T12kError(f"{archive} is unsafe: {e}; nothing was kept. Delete the archive and download it again "
                        f"from a trusted source.") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise T12kError(f"{archive} could not be unpacked ({e}); it is damaged or the disk is full: free space "
                        f"or delete the archive and run `t12k download` again.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("unpacked %s to %s", archive.name, dest)
    return dest
