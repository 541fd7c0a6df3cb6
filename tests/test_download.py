"""`t12k download` against a release served from 127.0.0.1 inside the test run (no outside network)."""

import dataclasses
import hashlib
import io
import re
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from click.testing import CliRunner
from test_importer import make_store

from cli import main
from trailers12k_feats import cache, paper
from trailers12k_feats.sources.download import (
    DownloadConfig,
    ReleasedFile,
    download,
    released_files,
)
from trailers12k_feats.sources.unpack import unpack_store
from trailers12k_feats.sources.zarr_import import ZARR_MISSING
from trailers12k_feats.utils import T12kError

ARCHIVE = "trailers_k_r2plus1d_fps24_fpc24.zarr.tar.gz"
STORE = ARCHIVE.removesuffix(".tar.gz")


class Release:
    """What the test server serves, and what it saw."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (file, Range header)
        self.truncate: dict[str, int] = {}  # file -> how many more responses to cut in half
        self.ignore_range = False  # answer every request with the whole file (200)
        self.endless: set[str] = set()  # files sent with no Content-Length, followed by zeros...
        self.endless_cap = 64 << 20  # ...up to this many bytes, so the test server always stops
        self.url = ""

    def ranges(self, name: str) -> list[str | None]:
        return [r for f, r in self.requests if f == name]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        rel: Release = self.server.release
        name = unquote(urlsplit(self.path).path.lstrip("/"))
        rng = self.headers.get("Range")
        rel.requests.append((name, rng))
        data = rel.files.get(name)
        if data is None:
            self.send_error(404)
            return
        if name in rel.endless:
            self.send_response(200)
            self.end_headers()
            sent, block = 0, data + bytes(1 << 16)
            try:
                while sent < rel.endless_cap:
                    self.wfile.write(block)
                    sent, block = sent + len(block), bytes(1 << 16)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client hung up, as it should
            return
        if self.server.release.ignore_range:
            rng = None
        start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1]) if rng else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if rel.truncate.get(name, 0) > 0:  # announce the whole body, send half, hang up
            rel.truncate[name] -= 1
            body = body[:len(body) // 2]
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.release = Release()
    httpd.release.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield httpd.release
    httpd.shutdown()
    httpd.server_close()


def tar_gz(members) -> bytes:
    """A tar.gz from (TarInfo, bytes or None) pairs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


@pytest.fixture
def release(server, tmp_path, toy_metadata):
    """mtgc.csv and one stream's archive on the server; returns (files registry, arrays)."""
    src = tmp_path / "src"
    arrays = make_store(src / STORE, F=512, n=30, seed=3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / STORE, arcname=STORE)
    metadata = toy_metadata(tmp_path / "m.csv", sorted(arrays)).read_bytes()
    server.files = {"mtgc.csv": metadata, ARCHIVE: buf.getvalue()}
    files = tuple(ReleasedFile(n, hashlib.md5(b).hexdigest(), None if n == "mtgc.csv" else "k_r2plus1d")
                  for n, b in server.files.items())
    return files, arrays


def config(server, tmp_path, files, **kw):
    kw = {"data_dir": tmp_path / "data", "base_url": server.url, "files": files, "retry_wait": 0, **kw}
    return DownloadConfig(**kw)


def test_registry_is_the_papers():
    files = {f.key: f for f in released_files()}
    assert list(files) == ["mtgc", *paper.STREAMS]
    assert files["mtgc"].md5 == "d730579950345b2c0f9c4a9779bd9d44"
    assert files["ik_swin"].file == "trailers_ik_swin_fps24_fpc24.zarr.tar.gz"
    assert files["ik_swin"].md5 == "e4f57101c465b6426bc3d9909ba36bdb"
    assert files["mtgc"].max_bytes == 1 << 20  # the released mtgc.csv has 12,000 lines of about 40 bytes
    for s in paper.STREAMS.values():  # caps, not sizes: 12,000 trailers x 400 clips on average x F float32 + 512 MiB
        assert files[s.name].max_bytes == 12_000 * 400 * s.dim * 4 + (512 << 20) == paper.RELEASED_MAX_BYTES[s.released]
    with pytest.raises(T12kError, match="max size factor must be at least 1 .*got 0.5; fix --max-size-factor"):
        DownloadConfig(max_size_factor=0.5)
    assert all(files[s.name].file == s.released for s in paper.STREAMS.values())
    cfg = DownloadConfig(only=("mtgc.csv", "i_swin", "trailers_ik_swin_fps24_fpc24.zarr", "i_swin"))
    assert cfg.only == ("mtgc", "i_swin", "ik_swin")
    assert cfg.url(files["i_swin"]) == "https://zenodo.org/record/5716410/files/trailers_i_swin_fpc24.zarr.tar.gz?download=1"
    assert DownloadConfig(base_url="http://mirror/x/").url(files["mtgc"]) == "http://mirror/x/mtgc.csv"
    with pytest.raises(T12kError, match="unknown released file 'nope'; valid names: mtgc, i_shufflenet"):
        DownloadConfig(only=("nope",))
    with pytest.raises(T12kError, match="must be an http:// or https:// address"):
        DownloadConfig(base_url="ftp://example.org/")
    with pytest.raises(T12kError, match="retries"):
        DownloadConfig(retries=-1)


def test_good_download_imports_and_is_idempotent(server, release, tmp_path):
    files, arrays = release
    cfg = config(server, tmp_path, files)
    done = dict(download(cfg, progress=False))
    data = tmp_path / "data"
    assert done == {"mtgc.csv": f"downloaded to {data / 'mtgc.csv'}, md5 ok",
                    ARCHIVE: f"imported to {data / 'k_r2plus1d.h5'}"}
    assert (data / "mtgc.csv").read_bytes() == server.files["mtgc.csv"]
    fs = cache.load(data / "k_r2plus1d.h5")
    assert fs.ids == sorted(arrays)
    for tid, x in arrays.items():
        np.testing.assert_array_equal(fs.trailer(tid).numpy(), x.astype(np.float16))
    assert fs.attrs.source == ARCHIVE and fs.attrs.config["md5"] == files[1].md5
    assert fs.attrs.config["url"] == server.url + ARCHIVE
    # the archive and the unpacked store are gone, nothing temporary is left
    assert sorted(p.name for p in (data / "released").iterdir()) == ["manifest.json"]
    n = len(server.requests)
    again = dict(download(cfg, progress=False))
    assert len(server.requests) == n and again[ARCHIVE].startswith("already imported")
    assert again["mtgc.csv"] == "already there, md5 ok"


@pytest.mark.parametrize("have, ignore_range", [(1000, False), ("all", False), (1000, True)])
def test_resume_sends_range(server, release, tmp_path, have, ignore_range):
    files, arrays = release
    data = server.files[ARCHIVE]
    have = len(data) if have == "all" else have  # "all": killed after the transfer, before the md5 check
    part = tmp_path / "data" / "released" / f"{ARCHIVE}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:have])
    server.ignore_range = ignore_range
    done = dict(download(config(server, tmp_path, files, only=("k_r2plus1d",), keep_zarr=True), progress=False))
    assert server.ranges(ARCHIVE) == [f"bytes={have}-"]  # the server saw the Range request
    assert done == {ARCHIVE: f"imported to {tmp_path / 'data' / 'k_r2plus1d.h5'}"}
    assert (part.parent / STORE / ".zgroup").is_file() and not part.exists()
    assert cache.read_ids(tmp_path / "data" / "k_r2plus1d.h5") == sorted(arrays)


def test_no_import_keeps_the_store_for_import_zarr(server, release, tmp_path):
    files, _ = release
    cfg = config(server, tmp_path, files, only=("k_r2plus1d",), import_caches=False)
    store = tmp_path / "data" / "released" / STORE
    assert dict(download(cfg, progress=False)) == {ARCHIVE: f"unpacked to {store}"}
    assert dict(download(cfg, progress=False)) == {ARCHIVE: f"already unpacked to {store}"}
    assert sorted(p.name for p in store.parent.iterdir()) == ["manifest.json", STORE]  # archive removed
    r = CliRunner().invoke(main, ["import-zarr", str(store), "--data-dir", str(tmp_path / "data")])
    assert r.exit_code == 0, r.output
    a = cache.read_attrs(tmp_path / "data" / "k_r2plus1d.h5")
    assert a.source == ARCHIVE and a.config["md5"] == files[1].md5  # provenance from the manifest
    # the cache came from the verified archive, so a download with import accepts it as done
    assert dict(download(config(server, tmp_path, files, only=("k_r2plus1d",)), progress=False))[ARCHIVE] == \
        f"already imported to {tmp_path / 'data' / 'k_r2plus1d.h5'}"


def test_wrong_md5_is_moved_aside(server, release, tmp_path):
    files, _ = release
    good = server.files[ARCHIVE]
    server.files[ARCHIVE] = good[:-10] + b"x" * 10  # same length, other bytes
    cfg = config(server, tmp_path, files)
    with pytest.raises(T12kError) as e:
        download(cfg, progress=False)
    released = tmp_path / "data" / "released"
    assert re.fullmatch(rf"{ARCHIVE} has md5 [0-9a-f]{{32}}, expected {files[1].md5}: the file is corrupt or not "
                        rf"the released one and was moved to {released / ARCHIVE}\.bad; delete it and run `t12k "
                        rf"download` again \(check --base-url if it happens again\)\.", str(e.value))
    assert (released / f"{ARCHIVE}.bad").read_bytes() == server.files[ARCHIVE]
    # nothing that looks valid: no archive, part, store or cache; the verified metadata is untouched
    assert sorted(p.name for p in released.iterdir()) == ["manifest.json", f"{ARCHIVE}.bad"]
    assert not (tmp_path / "data" / "k_r2plus1d.h5").exists() and (tmp_path / "data" / "mtgc.csv").exists()
    server.files[ARCHIVE] = good
    assert dict(download(cfg, progress=False))[ARCHIVE].startswith("imported")
    assert server.ranges(ARCHIVE)[-1] is None  # the bad file was not resumed from


def test_truncated_transfer_is_resumed_or_kept(server, release, tmp_path):
    files, _ = release
    size = len(server.files[ARCHIVE])
    server.truncate[ARCHIVE] = 1
    cfg = config(server, tmp_path, files, only=("k_r2plus1d",))
    assert dict(download(cfg, progress=False))[ARCHIVE].startswith("imported")
    assert server.ranges(ARCHIVE) == [None, f"bytes={size // 2}-"]

    (tmp_path / "data" / "k_r2plus1d.h5").unlink()
    server.requests.clear()
    server.truncate[ARCHIVE] = 99
    cfg = config(server, tmp_path, files, only=("k_r2plus1d",), retries=1)
    with pytest.raises(T12kError, match=rf"downloading {ARCHIVE} from {server.url}{ARCHIVE} failed after 2 attempts "
                                        rf"\(the transfer stopped at \d+ of {size} bytes\); .*\.part keeps the \d+ "
                                        rf"bytes received: run `t12k download` again to resume\."):
        download(cfg, progress=False)
    released = tmp_path / "data" / "released"
    assert sorted(p.name for p in released.iterdir()) == ["manifest.json", f"{ARCHIVE}.part"]
    assert len(server.requests) == 2 and server.ranges(ARCHIVE)[1].startswith("bytes=")
    server.truncate.clear()
    assert dict(download(cfg, progress=False))[ARCHIVE].startswith("imported")


def test_http_errors_and_foreign_files(server, release, tmp_path):
    files, _ = release
    with pytest.raises(T12kError, match=r"answered HTTP 404 \(Not Found\); check --base-url"):
        download(config(server, tmp_path, files, base_url=server.url + "elsewhere/"), progress=False)
    (tmp_path / "data" / "k_r2plus1d.h5").write_bytes(b"a cache made otherwise")
    server.requests.clear()
    with pytest.raises(T12kError, match="k_r2plus1d.h5 exists but was not imported from trailers_k_r2plus1d"):
        download(config(server, tmp_path, files), progress=False)
    (tmp_path / "data" / "mtgc.csv").write_text("mid\n")
    with pytest.raises(T12kError, match="mtgc.csv exists but is not the released mtgc.csv"):
        download(config(server, tmp_path, files), progress=False)
    assert server.requests == []  # refused before any transfer


def test_missing_zarr_stops_before_transfer(server, release, tmp_path, monkeypatch):
    files, _ = release
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(T12kError) as e:
        download(config(server, tmp_path, files), progress=False)
    assert str(e.value) == ZARR_MISSING and server.requests == []
    assert dict(download(config(server, tmp_path, files, only=("mtgc",)), progress=False))  # needs no zarr


def _dir(name):
    i = tarfile.TarInfo(name)
    i.type = tarfile.DIRTYPE
    return i, None


def _link(name, target, kind=tarfile.SYMTYPE):
    i = tarfile.TarInfo(name)
    i.type, i.linkname = kind, target
    return i, None


@pytest.mark.parametrize("members, why", [
    ([_dir(STORE), (tarfile.TarInfo(f"{STORE}/../../escaped"), b"x")], "has an absolute path or '..'"),
    ([(tarfile.TarInfo("/tmp/escaped"), b"x")], "has an absolute path or '..'"),
    ([_dir(STORE), _link(f"{STORE}/out", "../../..")], "points outside the target folder"),
    ([_dir(STORE), _link(f"{STORE}/pw", "/etc/passwd")], "points outside the target folder"),
    ([_dir(STORE), _link(f"{STORE}/hard", "../outside", tarfile.LNKTYPE)], "points outside the target folder"),
    ([_dir(STORE), _link(f"{STORE}/in", "."), (tarfile.TarInfo(f"{STORE}/in/x"), b"x")], "is written through"),
    ([_dir(STORE), _link(f"{STORE}/dev", "", tarfile.FIFOTYPE)], "fifo"),
])
def test_unsafe_archive_is_refused(tmp_path, members, why):
    archive = tmp_path / "dl" / ARCHIVE
    archive.parent.mkdir()
    archive.write_bytes(tar_gz(members))
    with pytest.raises(T12kError, match=f"is unsafe: .*{re.escape(why)}.*nothing was"):
        unpack_store(archive, archive.parent / STORE, progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dl", ARCHIVE]  # nothing extracted anywhere


def test_escaping_archive_from_the_server(server, release, tmp_path):
    files, _ = release
    server.files[ARCHIVE] = tar_gz([_dir(STORE), (tarfile.TarInfo(f"{STORE}/../../../evil"), b"x")])
    files = (files[0], ReleasedFile(ARCHIVE, hashlib.md5(server.files[ARCHIVE]).hexdigest(), "k_r2plus1d"))
    with pytest.raises(T12kError, match="is unsafe: member .*evil' has an absolute path or '..'; nothing was"):
        download(config(server, tmp_path, files), progress=False)
    assert not list(tmp_path.rglob("evil")) and not (tmp_path / "data" / "released" / STORE).exists()
    assert not (tmp_path / "data" / "k_r2plus1d.h5").exists()


def test_cli_download_then_reproduce(server, release, tmp_path, monkeypatch):
    files, arrays = release
    for f in files:  # the registry's md5s are the paper's; the test release has its own
        monkeypatch.setitem(paper.RELEASED_MD5, f.file, f.md5)
    run = CliRunner().invoke
    data = tmp_path / "data"
    r = run(main, ["download", "--data-dir", str(data), "--base-url", server.url, "--only", "mtgc,k_r2plus1d",
                   "--retries", "0"])
    assert r.exit_code == 0, r.output
    assert f"{ARCHIVE}: imported to {data / 'k_r2plus1d.h5'}" in r.output
    assert f"next: t12k reproduce --data-dir {data}" in r.output
    assert cache.load(data / "k_r2plus1d.h5").ids == sorted(arrays)
    r = run(main, ["reproduce", "--data-dir", str(data), "--rows", "k_r2plus1d", "--splits", "0",
                   "--max-epochs", "1", "--out", str(tmp_path / "res")])
    assert r.exit_code == 0, r.output
    assert "| R2+1D | 1 |" in r.output
    r = run(main, ["download", "--data-dir", str(data), "--base-url", server.url, "--only", "i_swin"])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith(
        f"Error: {server.url}trailers_i_swin_fpc24.zarr.tar.gz answered HTTP 404 (Not Found); check --base-url")
    assert "Traceback" not in r.output


def test_endless_download_without_length_stops_at_the_size_bound(server, release, tmp_path):
    files, _ = release
    size = len(server.files[ARCHIVE])
    files = (files[0], dataclasses.replace(files[1], max_bytes=size + 1000))
    server.endless.add(ARCHIVE)
    with pytest.raises(T12kError) as e:
        download(config(server, tmp_path, files, only=("k_r2plus1d",)), progress=False)
    assert str(e.value) == (
        f"{server.url}{ARCHIVE} sent more than {size + 1000} bytes for {ARCHIVE}, the most the released file can be; "
        f"the partial download was deleted; it is not the released file: check --base-url, or pass "
        f"--max-size-factor N (> 1) for a mirror that repackages the files.")
    assert list((tmp_path / "data" / "released").iterdir()) == []  # nothing half-written is left
    assert len(server.ranges(ARCHIVE)) == 1  # not retried


def test_announced_size_over_the_bound_is_refused_and_the_factor_loosens_it(server, release, tmp_path):
    files, arrays = release
    size = len(server.files[ARCHIVE])
    files = (files[0], dataclasses.replace(files[1], max_bytes=size // 2))
    cfg = config(server, tmp_path, files, only=("k_r2plus1d",))
    with pytest.raises(T12kError, match=rf"{ARCHIVE} announces {size} bytes for {ARCHIVE}, more than the released "
                                        rf"file can be \({size // 2} bytes\); nothing was downloaded; it is not the "
                                        rf"released file: check --base-url, or pass --max-size-factor N \(> 1\)"):
        download(cfg, progress=False)
    assert list((tmp_path / "data" / "released").iterdir()) == []
    # a partial file already past the bound is not resumed
    part = tmp_path / "data" / "released" / f"{ARCHIVE}.part"
    part.write_bytes(server.files[ARCHIVE][:size // 2 + 1])
    with pytest.raises(T12kError, match=rf"{ARCHIVE}\.part already holds {size // 2 + 1} bytes, more than the "
                                        rf"released {ARCHIVE} can be \({size // 2} bytes\); delete it"):
        download(cfg, progress=False)
    assert part.stat().st_size == size // 2 + 1
    done = dict(download(dataclasses.replace(cfg, max_size_factor=2.5), progress=False))  # resumes the part
    assert done[ARCHIVE].startswith("imported") and cache.read_ids(tmp_path / "data" / "k_r2plus1d.h5") == sorted(arrays)


def test_cli_max_size_factor(server, release, tmp_path, monkeypatch):
    files, _ = release
    for f in files:
        monkeypatch.setitem(paper.RELEASED_MD5, f.file, f.md5)
    monkeypatch.setitem(paper.RELEASED_MAX_BYTES, ARCHIVE, len(server.files[ARCHIVE]) // 2)
    args = ["download", "--data-dir", str(tmp_path / "data"), "--base-url", server.url, "--only", "k_r2plus1d",
            "--retries", "0"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "more than the released file can be" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, [*args, "--max-size-factor", "3"])
    assert r.exit_code == 0, r.output
    assert f"{ARCHIVE}: imported to" in r.output


def test_unpacking_is_bounded(tmp_path):
    archive = tmp_path / "dl" / ARCHIVE
    archive.parent.mkdir()
    archive.write_bytes(tar_gz([_dir(STORE), (tarfile.TarInfo(f"{STORE}/.zgroup"), b'{"zarr_format": 2}'),
                                (tarfile.TarInfo(f"{STORE}/zeros"), bytes(4 << 20))]))
    assert archive.stat().st_size < 64 << 10  # 4 MiB of zeros pack into a few KiB
    with pytest.raises(T12kError, match=rf"{ARCHIVE} unpacks to more than {1 << 20} bytes \(at member "
                                        rf"'{STORE}/zeros'\), more than a released store .*; nothing was kept"):
        unpack_store(archive, archive.parent / STORE, progress=False, max_bytes=1 << 20)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dl", ARCHIVE]
    assert unpack_store(archive, archive.parent / STORE, progress=False, max_bytes=5 << 20).is_dir()


def test_download_bounds_unpacking_by_the_archive_size(server, release, tmp_path, monkeypatch):
    files, _ = release
    server.files[ARCHIVE] = tar_gz([_dir(STORE), (tarfile.TarInfo(f"{STORE}/zeros"), bytes(4 << 20))])
    files = (files[0], ReleasedFile(ARCHIVE, hashlib.md5(server.files[ARCHIVE]).hexdigest(), "k_r2plus1d"))
    monkeypatch.setattr(paper, "UNPACK_FLOOR_BYTES", 1 << 20)  # the real floor (64 MiB) would let 4 MiB through
    cfg = config(server, tmp_path, files, only=("k_r2plus1d",))
    assert cfg.max_unpacked(1000) == 1 << 20 and cfg.max_unpacked(1 << 20) == paper.UNPACK_RATIO << 20
    assert dataclasses.replace(cfg, max_size_factor=2).max_unpacked(1 << 20) == 2 * paper.UNPACK_RATIO << 20
    with pytest.raises(T12kError, match=rf"unpacks to more than {1 << 20} bytes .*nothing was kept"):
        download(cfg, progress=False)
    released = tmp_path / "data" / "released"
    assert sorted(p.name for p in released.iterdir()) == ["manifest.json", ARCHIVE]  # the verified archive only
