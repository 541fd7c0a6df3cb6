"""`t12k`: the command line of trailers12k_feats. It only turns options into configs."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from trailers12k_feats.utils import T12kError, setup_logging

log = logging.getLogger("t12k")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def _names(text: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


def _errors(fn):
    """Turn a T12kError into one clear line and exit status 1, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except T12kError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def _data_options(fn):
    """--data-dir, or --metadata and --cache-dir separately."""
    fn = click.option("--on-missing", type=click.Choice(["error", "warn"]), default="error", show_default=True,
                      help="Trailers of the metadata missing from a cache: stop, or warn and drop them.")(fn)
    fn = click.option("--cache-dir", type=click.Path(path_type=Path),
                      help="Folder of <stream>.h5 caches [default: DATA_DIR].")(fn)
    fn = click.option("--metadata", type=click.Path(path_type=Path),
                      help="Labels and splits file [default: DATA_DIR/mtgc.csv].")(fn)
    fn = click.option("--data-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True,
                      help="Folder holding mtgc.csv and the <stream>.h5 caches.")(fn)
    return fn


def _resolve(data_dir: Path, metadata: Path | None, cache_dir: Path | None) -> tuple[Path, Path]:
    return metadata or data_dir / "mtgc.csv", cache_dir or data_dir


def _train_options(fn):
    """Options of TrainConfig; unset ones keep the config's defaults (the paper's protocol)."""
    from trailers12k_feats.training.heads import TEMPORAL

    opts = [
        click.option("--temporal", type=click.Choice(list(TEMPORAL)), help="Temporal module [tsfm]."),
        click.option("--fusion", type=click.Choice(["late", "early"]), help="Fusion of two streams [late]."),
        click.option("--max-epochs", type=int, help="Epoch limit [100]."),
        click.option("--batch-size", type=int, help="Trailers per batch [32]."),
        click.option("--lr", type=float, help="AdamW learning rate [1e-4]."),
        click.option("--seed", type=int, help="Seed of weights, windows and dropout [0]."),
        click.option("--precision", type=click.Choice(["bf16", "fp32"]), help="Autocast precision [bf16]."),
        click.option("--device", help="cpu or cuda[:N] [cpu]."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _train_config(split: int = 0, **opts):
    from trailers12k_feats.training.train import TrainConfig

    return TrainConfig(split=split, **{k: v for k, v in opts.items() if v is not None})


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="trailers12k_feats")
def main(verbose: bool) -> None:
    """Multi-label movie-trailer genre classification on cached clip features (DIViTA, Trailers12k)."""
    setup_logging(verbose)


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--trailers", type=int, default=12000, show_default=True, help="Number of trailers.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--streams", help="Comma-separated streams [all six of Table 6].")
@_errors
def synth(out_dir: Path, trailers: int, seed: int, streams: str | None) -> None:
    """Write a synthetic Trailers12k-shaped corpus: mtgc.csv and one cache per stream."""
    from trailers12k_feats.sources.synthetic import SynthConfig, make_corpus

    kw = {"streams": _names(streams)} if streams else {}
    make_corpus(out_dir, SynthConfig(num_trailers=trailers, seed=seed, **kw))
    click.echo(f"wrote {out_dir}")


@main.group()
def cache() -> None:
    """Inspect feature caches."""


@cache.command("info")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def cache_info(paths: tuple[Path, ...], as_json: bool) -> None:
    """Summarise caches (a folder lists every cache in it)."""
    from trailers12k_feats import cache as cache_mod

    files = [f for p in paths for f in (cache_mod.list_caches(p) if p.is_dir() else [p])]
    infos = [cache_mod.summary(f) for f in files]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    for s in infos:
        c = s["clips_per_trailer"]
        click.echo(f"{s['path']}  ({s['size_mb']} MB, {s['dtype']})\n"
                   f"  {s['name']}: {s['backbone']} ({s['kind']}, {s['pretraining']}), dim {s['feature_dim']}, "
                   f"fps {s['fps']:g}, fpc {s['fpc']}, segmentation {s['segmentation']}, source {s['source']}\n"
                   f"  {s['trailers']} trailers, {s['clips']} clips (min {c['min']}, median {c['median']:g}, "
                   f"max {c['max']}; {s['trailers_under_30_clips']} trailers under 30 clips)")


@cache.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_errors
def cache_validate(paths: tuple[Path, ...]) -> None:
    """Check caches' schema, index and values (NaN/Inf)."""
    from trailers12k_feats import cache as cache_mod

    files = [f for p in paths for f in (cache_mod.list_caches(p) if p.is_dir() else [p])]
    for f in files:
        cache_mod.validate(f)
        click.echo(f"ok  {f}")


@cache.command("merge")
@click.argument("cache_dir", type=click.Path(path_type=Path))
@_errors
def cache_merge(cache_dir: Path) -> None:
    """Merge extraction segments (from `t12k extract --shard`) into <stream>.h5 caches."""
    from trailers12k_feats.extraction.store import merge_all

    merged = merge_all(cache_dir)
    if not merged:
        raise T12kError(f"{cache_dir} has no extraction segments to merge.")
    for p in merged:
        click.echo(f"merged {p}")


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected K/N such as 2/4, got {text!r}") from None
    return k, n


def _weights(items: tuple[str, ...]) -> tuple[tuple[str, str], ...] | None:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH (or NAME=random), got {item!r}")
        out.append((name, path))
    return tuple(out) or None


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-b", "--backbone", "backbones", multiple=True, required=True,
              help="Backbone to run (repeat for several); `t12k backbones` lists them, or timm:<model>.")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True,
              help="Folder of the <stream>.h5 caches to write or extend.")
@click.option("--fps", type=float, help="Frames per second after resampling [24].")
@click.option("--fpc", type=int, help="Frames per clip [24].")
@click.option("--segmentation", type=click.Choice(["shots", "fixed"]), help="Clips within shots, or ignore cuts [shots].")
@click.option("--leftover", type=click.Choice(["drop", "pad"]), help="Shot remainder shorter than a clip [drop].")
@click.option("--shot-threshold", type=float, help="ContentDetector threshold [27].")
@click.option("--min-shot-frames", type=int, help="Minimum frames between cuts [15].")
@click.option("--frame-pool", type=click.Choice(["mean", "center"]), help="2D backbones: clip = mean of frames or centre frame [mean].")
@click.option("--image-frames", type=int, help="2D backbones: frames embedded per clip, evenly spaced; 0 = all [0].")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="Autocast precision [fp32].")
@click.option("--device", help="cpu or cuda[:N] [cpu].")
@click.option("--batch-size", type=int, help="Clips per forward pass [16].")
@click.option("--workers", type=int, help="Decoding processes; 0 decodes in the main process [0 on the CPU, "
              "up to 8 with CUDA].")
@click.option("--shard", help="K/N: process every N-th video starting at the K-th (merge with `t12k cache merge`).")
@click.option("--weights", "weights", multiple=True, help="NAME=PATH of a weight file, or NAME=random (repeatable).")
@click.option("--random-weights", is_flag=True, default=None, help="Random weights for every backbone (smoke tests).")
@click.option("--flush-every", "flush_trailers", type=int, help="Save finished trailers every N trailers [100].")
@_errors
def extract(inputs, backbones, cache_dir, shard, weights, fps, fpc, segmentation, leftover, shot_threshold,
            min_shot_frames, **opts) -> None:
    """Embed the clips of videos (files, folders or list files) into feature caches.

    Resumable: finished trailers are skipped. Bad videos are skipped and listed in
    CACHE/failures.jsonl; the exit status is 3 when any failed.
    """
    from trailers12k_feats.extraction.extract import ExtractConfig
    from trailers12k_feats.extraction.extract import extract as run
    from trailers12k_feats.extraction.video import ClipSpec

    clip = {"fps": fps, "fpc": fpc, "segmentation": segmentation, "leftover": leftover,
            "shot_threshold": shot_threshold, "min_shot_frames": min_shot_frames}
    cfg = ExtractConfig(backbones=backbones, clip=ClipSpec(**{k: v for k, v in clip.items() if v is not None}),
                        **{k: v for k, v in {**opts, "shard": _shard(shard), "weights": _weights(weights)}.items()
                           if v is not None})
    res = run(list(inputs), cache_dir, cfg)
    click.echo(f"{res.extracted} trailer(s) extracted ({res.clips} clips, {res.seconds:.0f} s), "
               f"{res.skipped} already done, {len(res.failures)} failed")
    for p in res.caches:
        click.echo(f"  {p}")
    if res.failures:
        click.echo(f"failures listed in {cache_dir / 'failures.jsonl'}" if cfg.shard[1] == 1
                   else f"failures listed in {cache_dir}/failures.shard*.jsonl", err=True)
        sys.exit(3)


@main.command()
@click.argument("videos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
              help="A run directory of `t12k train` / `t12k reproduce` trained on extracted features.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path),
              help="Keep the extracted features here and reuse them next time [a temporary folder].")
@click.option("--device", help="cpu or cuda[:N] [cpu].")
@click.option("--workers", type=int, help="Decoding processes [0 on the CPU, up to 8 with CUDA].")
@click.option("--weights", "weights", multiple=True, help="NAME=PATH of a backbone's weight file (repeatable).")
@_errors
def predict(videos, run_dir, fmt, cache_dir, weights, **opts) -> None:
    """The 10 genre probabilities of videos (files, folders or list files) with a trained run."""
    from trailers12k_feats.apps.predict import PredictConfig, format_predictions
    from trailers12k_feats.apps.predict import predict as run

    cfg = PredictConfig(run_dir=run_dir, cache_dir=cache_dir,
                        **{k: v for k, v in {**opts, "weights": _weights(weights)}.items() if v is not None})
    result = run(list(videos), cfg, progress=fmt == "table")
    click.echo(format_predictions(result, fmt))
    if result["failures"]:
        sys.exit(3)


@main.command("backbones")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors
def backbones_(as_json: bool) -> None:
    """List the backbone registry: dims, inputs, pretraining and whether weights are present."""
    from trailers12k_feats.extraction.backbones import describe, weights_dir

    rows = describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    cols = ("name", "stream", "kind", "dim", "input", "pretraining", "weights", "found")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    click.echo("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    click.echo(f"\nweights are read from {weights_dir()} or --weights NAME=PATH; any timm 2D model: timm:<name>")


@main.command()
@_data_options
@click.option("--row", help="A Table 6 row (sets --image/--video), e.g. ik_swin or shufflenet_fusion.")
@click.option("--image", help="Image stream: a name in the cache folder or a path to an .h5 cache.")
@click.option("--video", help="Video stream: a name in the cache folder or a path to an .h5 cache.")
@click.option("--split", type=click.IntRange(0, 2), default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory to create.")
@_train_options
@_errors
def train(data_dir, metadata, cache_dir, on_missing, row, image, video, split, out, **opts) -> None:
    """Train one head on one split and save a run directory."""
    from trailers12k_feats import cache as cache_mod
    from trailers12k_feats.paper import get_row
    from trailers12k_feats.training.data import load_metadata
    from trailers12k_feats.training.metrics import format_metrics
    from trailers12k_feats.training.train import load_streams, train_run

    cfg = _train_config(split, **opts)
    metadata, cache_dir = _resolve(data_dir, metadata, cache_dir)
    if row:
        r = get_row(row)
        image, video = image or r.image, video or r.video
    if not (image or video):
        raise T12kError("give --row, or --image and/or --video.")
    if out.exists():
        raise T12kError(f"run directory {out} already exists; choose another --out or delete it.")
    roles = {k: (Path(v) if v.endswith(cache_mod.SUFFIX) else cache_mod.stream_path(cache_dir, v))
             for k, v in (("image", image), ("video", video)) if v}
    meta = load_metadata(metadata)
    meta.check_splits([split])
    sets, rows = load_streams(meta, roles, on_missing)
    res = train_run(cfg, meta, sets, rows, out, desc=f"split{split}")
    click.echo(f"best epoch {res.best_epoch}/{res.epochs}\n  val  {format_metrics(res.val)}\n"
               f"  test {format_metrics(res.test)}\nrun saved to {out}")


def _rows_splits(rows: str | None, splits: str) -> dict:
    from trailers12k_feats.paper import TABLE6

    return {"rows": _names(rows) or tuple(TABLE6), "splits": _ints(splits)}


@main.command()
@_data_options
@click.option("--rows", help="Comma-separated Table 6 rows [all eight].")
@click.option("--splits", default="0,1,2", show_default=True, help="Comma-separated splits.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results/transfer"), show_default=True)
@_train_options
@_errors
def reproduce(data_dir, metadata, cache_dir, on_missing, rows, splits, out, **opts) -> None:
    """Run Table 6 (rows x splits), resuming finished runs; print it beside the paper."""
    from trailers12k_feats.training.reproduce import ReproduceConfig
    from trailers12k_feats.training.reproduce import reproduce as run

    metadata, cache_dir = _resolve(data_dir, metadata, cache_dir)
    cfg = ReproduceConfig(metadata=metadata, cache_dir=cache_dir, out_dir=out, on_missing=on_missing,
                          train=_train_config(**opts), **_rows_splits(rows, splits))
    click.echo(run(cfg))
    click.echo(f"\nresults in {out} (val.csv, tst.csv, summary.csv, summary.md)")


@main.command()
@_data_options
@click.option("--rows", help="Comma-separated Table 6 rows [all eight].")
@click.option("--splits", default="0,1,2", show_default=True, help="Comma-separated splits.")
@click.option("--pool", type=click.Choice(["mean", "meanmax"]), default="mean", show_default=True,
              help="Pooling of each trailer's clips.")
@click.option("--alpha", type=float, default=1000.0, show_default=True, help="Ridge penalty.")
@_errors
def probe(data_dir, metadata, cache_dir, on_missing, rows, splits, pool, alpha) -> None:
    """Linear probe on pooled clip features: the Table 6 rows in seconds."""
    from trailers12k_feats.training.probe import ProbeConfig
    from trailers12k_feats.training.probe import probe as run
    from trailers12k_feats.training.reproduce import format_table, summarise

    metadata, cache_dir = _resolve(data_dir, metadata, cache_dir)
    cfg = ProbeConfig(metadata=metadata, cache_dir=cache_dir, pool=pool, alpha=alpha, on_missing=on_missing,
                      **_rows_splits(rows, splits))
    table = run(cfg)
    click.echo(format_table(summarise(table["test"]), f"test, linear probe on {pool}-pooled features"))


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True,
              help="Folder to fill: mtgc.csv, one <stream>.h5 cache per stream, downloads under released/.")
@click.option("--only", multiple=True, metavar="NAME",
              help="Fetch only these (repeat or comma-separate): mtgc, a stream name, or a file name [all seven].")
@click.option("--base-url", envvar="T12K_BASE_URL",
              help="A mirror: a URL containing {file}, or a folder URL the file names are appended to "
                   "[Zenodo record 5716410; env T12K_BASE_URL].")
@click.option("--no-import", is_flag=True, help="Download, verify and unpack the zarr stores; do not import them.")
@click.option("--keep-zarr", is_flag=True, help="Keep the unpacked zarr stores after importing them.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Dtype of the imported caches.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds without data before a connection counts as failed.")
@click.option("--retries", type=int, default=3, show_default=True,
              help="Further attempts after a failed transfer, each resuming it.")
@_errors
def download(data_dir, only, base_url, no_import, keep_zarr, dtype, timeout, retries) -> None:
    """Download the authors' released features (about 40 GB), verify their md5, unpack and import them."""
    from trailers12k_feats.sources.download import DownloadConfig
    from trailers12k_feats.sources.download import download as run

    kw = {"base_url": base_url} if base_url else {}
    cfg = DownloadConfig(data_dir=data_dir, only=tuple(n for o in only for n in _names(o) or ()),
                         import_caches=not no_import, keep_zarr=keep_zarr, dtype=dtype, timeout=timeout,
                         retries=retries, **kw)
    for file, what in run(cfg):
        click.echo(f"{file}: {what}")
    if not no_import:
        click.echo(f"\nnext: t12k reproduce --data-dir {data_dir}")


@main.command("import-zarr")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--name", help="Stream name of the cache [from SRC's name: trailers_i_swin_fpc24.zarr -> i_swin].")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True,
              help="Folder to write <name>.h5 into.")
@click.option("--out", type=click.Path(path_type=Path), help="Cache file to write [DATA_DIR/<name>.h5].")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Dtype of the cache.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache.")
@_errors
def import_zarr(src, name, data_dir, out, dtype, overwrite) -> None:
    """Convert a released zarr store (SRC.zarr folder) into an HDF5 feature cache, every trailer and clip."""
    from trailers12k_feats.sources.download import provenance
    from trailers12k_feats.sources.zarr_import import ImportConfig
    from trailers12k_feats.sources.zarr_import import import_zarr as run

    cfg = ImportConfig(src, out_dir=data_dir, out=out, name=name, dtype=dtype, overwrite=overwrite,
                       provenance=provenance(src))
    click.echo(f"wrote {run(cfg)}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Report folder to write [PATH/report].")
@click.option("--metadata", type=click.Path(path_type=Path),
              help="mtgc.csv with the runs' labels, for PR curves [the one in each run's config.json].")
@_errors
def report(path: Path, out: Path | None, metadata: Path | None) -> None:
    """Plots and an HTML page for a run directory (train) or a results folder (reproduce)."""
    from trailers12k_feats.apps.report import write_report

    click.echo(f"report written to {write_report(path, out, metadata)}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True)
@click.option("--trailers", type=int, help="Synthetic trailer videos to make [160].")
@click.option("--max-epochs", type=int, help="Epoch limit per run [100].")
@click.option("--seed", type=int, help="Seed of the videos, labels, splits and heads [0].")
@_errors
def demo(out: Path, **opts) -> None:
    """The whole pipeline: synthetic trailer videos -> extraction (real ImageNet MobileNetV2 and a
    3D ShuffleNet) -> image, video and fusion heads -> results, plots -> genres of a held-out video."""
    from trailers12k_feats.apps.demo import DemoConfig, run

    res = run(out, DemoConfig(**{k: v for k, v in opts.items() if v is not None}))
    click.echo("\ntest set of split 0:\n" + res["table"])
    click.echo("\nplots: " + ", ".join(str(p) for p in res["reports"]))
    click.echo("\nheld-out video, fusion head:\n" + res["prediction"] + f"\ntrue genres: {res['truth']}")


if __name__ == "__main__":
    sys.exit(main())
