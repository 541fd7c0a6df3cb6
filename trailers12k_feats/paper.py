"""The paper's feature streams and Table 6 (docs/paper.md): names, dims and reported numbers."""

from __future__ import annotations

from dataclasses import dataclass

from trailers12k_feats.utils import T12kError


@dataclass(frozen=True)
class Stream:
    """One released feature set: cache file `<name>.h5`, its dim and how it was made."""

    name: str
    dim: int
    backbone: str
    kind: str  # "2d" image model or "3d" video model
    pretraining: str
    released: str  # file name of the released zarr archive


STREAMS: dict[str, Stream] = {s.name: s for s in (
    Stream("i_shufflenet", 1024, "shufflenet_v2_x1_0", "2d", "ImageNet-1K", "trailers_i_shufflenet_fpc24.zarr.tar.gz"),
    Stream("k_shufflenet", 1024, "shufflenet_v2_3d_x1_0", "3d", "Kinetics", "trailers_k_shufflenet_fps24_fpc24.zarr.tar.gz"),
    Stream("i_resnet", 2048, "resnet50", "2d", "ImageNet-1K", "trailers_i_resnet_fpc24.zarr.tar.gz"),
    Stream("k_r2plus1d", 512, "r2plus1d_18", "3d", "Kinetics-400", "trailers_k_r2plus1d_fps24_fpc24.zarr.tar.gz"),
    Stream("i_swin", 768, "swin_t", "2d", "ImageNet-1K", "trailers_i_swin_fpc24.zarr.tar.gz"),
    Stream("ik_swin", 768, "swin3d_t", "3d", "ImageNet-1K + Kinetics-400", "trailers_ik_swin_fps24_fpc24.zarr.tar.gz"),
)}

# The files of the authors' release (Zenodo record 5716410) and their md5 (docs/paper.md).
RELEASE_URL = "https://zenodo.org/record/5716410/files/{file}?download=1"
METADATA_FILE = "mtgc.csv"
RELEASED_MD5: dict[str, str] = {
    METADATA_FILE: "d730579950345b2c0f9c4a9779bd9d44",
    "trailers_i_shufflenet_fpc24.zarr.tar.gz": "15eac938134322e8e6c611f844ef3d32",
    "trailers_k_shufflenet_fps24_fpc24.zarr.tar.gz": "cbf2016ad294c50b75baaf8e25c7aaaf",
    "trailers_i_resnet_fpc24.zarr.tar.gz": "ed284507adcd04d067ba48a1ceab1b3d",
    "trailers_k_r2plus1d_fps24_fpc24.zarr.tar.gz": "90897c9508790e67aab3c3b8c69ce668",
    "trailers_i_swin_fpc24.zarr.tar.gz": "d544acb04179bc723d46c88adfa43aa0",
    "trailers_ik_swin_fps24_fpc24.zarr.tar.gz": "e4f57101c465b6426bc3d9909ba36bdb",
}

# Upper bounds on the released files' sizes, in bytes. The record's file sizes are not known
# here (only "about 40 GB in all"), so these are generous caps, not sizes: they stop a server
# that sends without end (or announces too much) before the md5 can be checked. An archive
# holds 12,000 trailers of float32 (clips, F) arrays: 400 clips per trailer on average (the
# 40 GB total implies about 140; trailers run about two minutes, one clip a second) x F x 4
# bytes, plus 512 MiB for tar headers and small files. mtgc.csv: 12,000 lines of at most 64
# bytes, 1 MiB. `t12k download --max-size-factor` multiplies every bound, for mirrors that
# repackage the files.
RELEASE_TRAILERS = 12_000
MAX_MEAN_CLIPS = 400


def _archive_cap(dim: int) -> int:
    return RELEASE_TRAILERS * MAX_MEAN_CLIPS * dim * 4 + (512 << 20)


RELEASED_MAX_BYTES: dict[str, int] = {
    METADATA_FILE: 1 << 20,
    **{s.released: _archive_cap(s.dim) for s in STREAMS.values()},
}
# Unpacking an archive may write at most this many times its own size (float32 features
# hardly compress, so a real store unpacks to about 1x), and at least UNPACK_FLOOR_BYTES.
UNPACK_RATIO = 4
UNPACK_FLOOR_BYTES = 64 << 20


@dataclass(frozen=True)
class Row:
    """A Table 6 row: an image stream, a video stream, or both (late fusion)."""

    name: str
    label: str
    image: str | None
    video: str | None
    paper: dict[str, tuple[float, float]]  # metric -> (mean, std) on test, x100

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(s for s in (self.image, self.video) if s)


def _p(u: str, m: str, w: str, s: str) -> dict[str, tuple[float, float]]:
    return {k: tuple(float(x) for x in v.split("±")) for k, v in zip(("uAP", "mAP", "wAP", "sAP"), (u, m, w, s))}


TABLE6: dict[str, Row] = {r.name: r for r in (
    Row("i_shufflenet", "ShuffleNet-2D", "i_shufflenet", None, _p("71.69±0.44", "66.47±0.73", "70.51±0.50", "76.60±0.77")),
    Row("k_shufflenet", "ShuffleNet-3D", None, "k_shufflenet", _p("63.43±1.54", "58.18±1.50", "63.59±1.46", "69.49±1.58")),
    Row("shufflenet_fusion", "ShuffleNet-Fusion", "i_shufflenet", "k_shufflenet", _p("72.11±0.56", "67.08±0.37", "71.42±0.41", "76.66±0.73")),
    Row("i_resnet", "ResNet", "i_resnet", None, _p("70.92±3.49", "66.16±2.45", "70.23±2.11", "75.85±3.05")),
    Row("k_r2plus1d", "R2+1D", None, "k_r2plus1d", _p("71.76±2.72", "66.09±2.44", "70.81±2.21", "76.33±2.02")),
    Row("resnet_fusion", "ResNet-Fusion", "i_resnet", "k_r2plus1d", _p("73.28±0.66", "68.03±0.63", "72.14±0.72", "77.76±0.44")),
    Row("i_swin", "Swin-2D", "i_swin", None, _p("72.96±4.17", "67.68±2.63", "71.70±2.44", "77.77±4.08")),
    Row("ik_swin", "Swin-3D", None, "ik_swin", _p("75.71±2.43", "70.44±2.10", "74.30±2.11", "80.19±2.61")),
)}


def get_row(name: str) -> Row:
    """A Table 6 row by name (also accepts the paper's label, e.g. "Swin-3D")."""
    if name in TABLE6:
        return TABLE6[name]
    for row in TABLE6.values():
        if row.label.lower() == name.lower():
            return row
    raise T12kError(f"unknown Table 6 row {name!r}; valid rows: {', '.join(TABLE6)}.")



def row_order_key(name: str) -> tuple[int, str]:
    """Sort key that puts run names in Table 6's order, names outside Table 6 after them by name."""
    order = list(TABLE6)
    return (order.index(name) if name in TABLE6 else len(order), name)
