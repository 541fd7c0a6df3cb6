"""`t12k`: the command line of trailers12k_feats. It only turns options into configs.

Options left out stay None and are dropped (`given`), so every default lives in its config
dataclass, which help reads when it is printed (see trailers12k_feats/cli_options.py); a
command imports the package's modules it needs when it runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from trailers12k_feats.cli_options import (
    CLIP,
    DEMO,
    EXTRACT,
    IMPORT,
    PREDICT,
    PROBE,
    REPRODUCE,
    SYNTH,
    TRAIN,
    TRAIN_JOB,
    WORKERS_DEFAULT,
    LazyChoice,
    clips_option,
    data_options,
    download_options,
    engine_options,
    errors,
    extract_options,
    given,
    grid_train_options,
    ints,
    names,
    option,
    protocol_option,
    resolve_data,
    rows_splits,
    shard_spec,
    shot_options,
    train_options,
    weight_pairs,
)
from trailers12k_feats.utils import interrupts_caught, setup_logging


class _Main(click.Group):
    """The `t12k` group: Ctrl-C in any command ends with one line and status 130, as shells expect.

    Work finished before the interrupt stays (extraction flushes its finished trailers, a
    download keeps its partial file for the next run to resume).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with interrupts_caught():  # a Ctrl-C a library swallows still stops extraction's loop
                return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(130) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="trailers12k_feats")
def main(verbose: bool) -> None:
    """Multi-label movie-trailer genre classification on cached clip features (DIViTA, Trailers12k)."""
    setup_logging(verbose)


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@option(SYNTH, "--trailers", field="num_trailers", type=int, help="Number of trailers.")
@option(SYNTH, "--seed", type=int, help="Seed of labels, splits and features.")
@option(SYNTH, "--streams", help="Comma-separated streams.")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True,
              help="Processes making the features; 0: one per usable core. The corpus is the same for any number.")
@errors
def synth(out_dir: Path, trailers: int | None, seed: int | None, streams: str | None, workers: int) -> None:
    """Write a synthetic Trailers12k-shaped corpus: mtgc.csv and one cache per stream."""
    from trailers12k_feats.sources.synthetic import SynthConfig, make_corpus

    make_corpus(out_dir, SynthConfig(**given(num_trailers=trailers, seed=seed, streams=names(streams))),
                workers=workers)
    click.echo(f"wrote {out_dir}")


@main.group()
def cache() -> None:
    """Inspect feature caches."""


@cache.command("info")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@errors
def cache_info(paths: tuple[Path, ...], as_json: bool) -> None:
    """Summarise caches (a folder lists every cache in it)."""
    from trailers12k_feats.cache_info import expand, format_summary, summary

    infos = [summary(f) for f in expand(paths)]
    click.echo(json.dumps(infos, indent=2) if as_json else "\n".join(map(format_summary, infos)))


@cache.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@errors
def cache_validate(paths: tuple[Path, ...]) -> None:
    """Check caches' schema, index and values (NaN/Inf), and that stored pooled summaries match the clips."""
    from trailers12k_feats import cache as cache_mod
    from trailers12k_feats.cache_info import expand

    for f in expand(paths):
        cache_mod.validate(f, pooled=True)
        click.echo(f"ok  {f}")


@cache.command("merge")
@click.argument("cache_dir", type=click.Path(path_type=Path))
@errors
def cache_merge(cache_dir: Path) -> None:
    """Merge extraction segments (from `t12k extract --shard`) into <stream>.h5 caches."""
    from trailers12k_feats.extraction.store import merge_all

    for p in merge_all(cache_dir):
        click.echo(f"merged {p}")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@extract_options
@errors
@engine_options("decode_cpus", "gpus_per_actor", "actors", "actor_cpus", "ordered")
def extract(inputs, backbones, cache_dir, shard, weights, fps, fpc, segmentation, leftover, shots, shot_threshold,
            min_shot_frames, engine, **opts) -> None:
    """Embed the clips of videos (files, folders or list files) into feature caches.

    Resumable: finished trailers are skipped. Bad videos are skipped and listed in
    CACHE/failures.jsonl, and so are partial ones (truncated: see --partial); the exit
    status is 3 when any failed or was partial. With --engine ray the videos and --cache
    must be on a filesystem every node of the cluster reaches (NFS, Lustre, ...).
    """
    from trailers12k_feats.extraction.extract import ExtractConfig
    from trailers12k_feats.extraction.extract import extract as run
    from trailers12k_feats.extraction.video import ClipSpec

    clip = ClipSpec(**given(fps=fps, fpc=fpc, segmentation=segmentation, leftover=leftover, shots=shots,
                             shot_threshold=shot_threshold, min_shot_frames=min_shot_frames))
    cfg = ExtractConfig(backbones=backbones, clip=clip,
                        **given(**opts, shard=shard_spec(shard), weights=weight_pairs(weights)))
    res = run(list(inputs), cache_dir, cfg, engine=engine)
    click.echo(res.summary(cfg.partial))
    if not res.ok:
        click.echo(f"failures listed in {res.report}", err=True)
        sys.exit(3)


@main.command("shots")
@click.argument("videos", nargs=-1, required=True, type=click.Path(path_type=Path))
@shot_options
@option(CLIP, "--fps", type=float, help="Frames per second after resampling (frame numbers count at this rate).")
@option(EXTRACT, "--device", help="cpu or cuda[:N]: where TransNetV2 runs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@errors
def shots_cmd(videos, device, as_json, **clip) -> None:
    """The shots of videos (files, folders or list files) as `t12k extract` cuts them, without any backbone.

    Each shot's first and end frame (exclusive) and times; frames of a dissolve or fade belong
    to no shot.
    """
    from trailers12k_feats.extraction.shots import find_shots, format_shots
    from trailers12k_feats.extraction.video import ClipSpec

    found = find_shots(list(videos), ClipSpec(**given(**clip)), **given(device=device))
    click.echo(json.dumps(found, indent=2) if as_json else format_shots(found))


@main.command()
@click.argument("videos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
              help="A run directory of `t12k train` / `t12k reproduce` trained on extracted features.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path),
              help="Keep the extracted features here and reuse them next time  [default: a temporary folder]")
@option(PREDICT, "--device", help="cpu or cuda[:N].")
@click.option("--workers", type=int, help=f"Decoding processes  {WORKERS_DEFAULT}")
@click.option("--weights", "weights", multiple=True, help="NAME=PATH of a backbone's weight file (repeatable).")
@errors
def predict(videos, run_dir, fmt, cache_dir, weights, **opts) -> None:
    """The 10 genre probabilities of videos (files, folders or list files) with a trained run.

    Every video gets a row with a status (ok, partial, failed) and, when not ok, the reason,
    which also goes to stderr; the exit status is 3 when any video is not ok.
    """
    from trailers12k_feats.apps.predict import PredictConfig, format_predictions
    from trailers12k_feats.apps.predict import predict as run

    cfg = PredictConfig(run_dir=run_dir, cache_dir=cache_dir, **given(**opts, weights=weight_pairs(weights)))
    result = run(list(videos), cfg, progress=fmt == "table")
    click.echo(format_predictions(result, fmt))
    for r in result["failures"]:
        click.echo(f"{r['id']}: {r['status']}: {r['error']}", err=True)
    if result["failures"]:
        sys.exit(3)


@main.command("backbones")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@errors
def backbones_(as_json: bool) -> None:
    """List the backbone registry: dims, inputs, pretraining and whether weights are present."""
    from trailers12k_feats.extraction.backbones import describe, format_registry

    rows = describe()
    click.echo(json.dumps(rows, indent=2) if as_json else format_registry(rows))


@main.command()
@data_options(TRAIN_JOB)
@click.option("--row", help="A Table 6 row (sets --image/--video), e.g. ik_swin or shufflenet_fusion.")
@click.option("--image", help="Image stream: a name in the cache folder or a path to an .h5 cache.")
@click.option("--video", help="Video stream: a name in the cache folder or a path to an .h5 cache.")
@option(TRAIN, "--split", type=int, help="Split of mtgc.csv to train and evaluate on.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory to create.")
@clips_option
@protocol_option(TRAIN)
@train_options
@errors
def train(data_dir, metadata, cache_dir, on_missing, row, image, video, out, allow_mismatched_clips, **opts) -> None:
    """Train one head on one split and save a run directory."""
    from trailers12k_feats.training.train import (
        TrainConfig,
        TrainJob,
        train_from_caches,
    )

    metadata, cache_dir = resolve_data(data_dir, metadata, cache_dir)
    job = TrainJob(metadata=metadata, cache_dir=cache_dir, out=out, train=TrainConfig(**given(**opts)),
                   allow_mismatched_clips=allow_mismatched_clips,
                   **given(row=row, image=image, video=video, on_missing=on_missing))
    click.echo(f"{train_from_caches(job).summary()}\nrun saved to {out}")


@main.command()
@data_options(REPRODUCE)
@rows_splits(REPRODUCE)
@option(REPRODUCE, "--out", field="out_dir", type=click.Path(path_type=Path), help="Results folder.")
@option(REPRODUCE, "--group/--no-group", default=None,
        help="Train the splits of a row as one batched model (the same runs up to float rounding, faster), "
             "or one run at a time.")
@option(REPRODUCE, "--jobs", type=click.IntRange(0), help="Processes training rows at once, a row each, and runs "
        "that groups hand to a process with no row left; 0: a process per core (per two on a GPU), as many as the "
        "rows' caches fit in RAM.")
@clips_option
@protocol_option(REPRODUCE)
@grid_train_options
@errors
@engine_options("cpus_per_run")
def reproduce(data_dir, metadata, cache_dir, on_missing, rows, splits, out, group, jobs, allow_mismatched_clips,
              protocol, engine, precision, device, **lists) -> None:
    """Run Table 6 (rows x splits), resuming finished runs; print it beside the paper.

    Comma lists make a grid of settings, one results folder each under --out (e.g.
    temporal-gru_lr-0.0003), compared in --out/grid.md. --engine ray trains the runs as Ray
    tasks; --out and the data must then be on a filesystem every node reaches.
    """
    from trailers12k_feats.training.grid import Grid, reproduce_grid
    from trailers12k_feats.training.reproduce import ReproduceConfig
    from trailers12k_feats.training.train import TrainConfig

    metadata, cache_dir = resolve_data(data_dir, metadata, cache_dir)
    grid = Grid.parse(**lists)
    cfg = ReproduceConfig(metadata=metadata, cache_dir=cache_dir,
                          train=TrainConfig(**grid.first(), **given(precision=precision, device=device)),
                          allow_mismatched_clips=allow_mismatched_clips,
                          **given(out_dir=out, on_missing=on_missing, rows=names(rows), splits=ints(splits),
                                  protocol=protocol, group=group, jobs=jobs))
    click.echo(reproduce_grid(cfg, grid, engine))
    click.echo(f"\n{grid.where(cfg.out_dir)}")


@main.command()
@data_options(PROBE)
@rows_splits(PROBE)
@option(PROBE, "--pool", type=LazyChoice("trailers12k_feats.training.probe:POOLS"),
        help="Pooling of each trailer's clips.")
@option(PROBE, "--alpha", type=float, help="Ridge penalty.")
@clips_option
@errors
def probe(data_dir, metadata, cache_dir, on_missing, rows, splits, pool, alpha, allow_mismatched_clips) -> None:
    """Linear probe on pooled clip features: the Table 6 rows in seconds."""
    from trailers12k_feats.training.probe import ProbeConfig, format_probe
    from trailers12k_feats.training.probe import probe as run

    metadata, cache_dir = resolve_data(data_dir, metadata, cache_dir)
    cfg = ProbeConfig(metadata=metadata, cache_dir=cache_dir, allow_mismatched_clips=allow_mismatched_clips,
                      **given(pool=pool, alpha=alpha, on_missing=on_missing, rows=names(rows), splits=ints(splits)))
    click.echo(format_probe(run(cfg), cfg.pool))


@main.command()
@download_options
@errors
def download(data_dir, only, base_url, no_import, keep_zarr, dtype, timeout, retries, max_size_factor) -> None:
    """Download the authors' released features (about 40 GB), verify their md5, unpack and import them."""
    from trailers12k_feats.sources.download import DownloadConfig
    from trailers12k_feats.sources.download import download as run

    cfg = DownloadConfig(only=tuple(n for o in only for n in names(o) or ()), import_caches=not no_import,
                         keep_zarr=keep_zarr, **given(data_dir=data_dir, base_url=base_url or None, dtype=dtype,
                                                       timeout=timeout, retries=retries,
                                                       max_size_factor=max_size_factor))
    for file, what in run(cfg):
        click.echo(f"{file}: {what}")
    if not no_import:
        click.echo(f"\nnext: t12k reproduce --data-dir {cfg.data_dir}")


@main.command("import-zarr")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--name", help="Stream name of the cache  [default: from SRC's name: trailers_i_swin_fpc24.zarr "
              "-> i_swin]")
@option(IMPORT, "--data-dir", field="out_dir", type=click.Path(path_type=Path), help="Folder to write <name>.h5 into.")
@click.option("--out", type=click.Path(path_type=Path), help="Cache file to write  [default: DATA_DIR/<name>.h5]")
@option(IMPORT, "--dtype", type=click.Choice(["float16", "float32"]), help="Dtype of the cache.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache.")
@errors
def import_zarr(src, name, data_dir, out, dtype, overwrite) -> None:
    """Convert a released zarr store (SRC.zarr folder) into an HDF5 feature cache, every trailer and clip."""
    from trailers12k_feats.sources.download import provenance
    from trailers12k_feats.sources.zarr_import import ImportConfig
    from trailers12k_feats.sources.zarr_import import import_zarr as run

    cfg = ImportConfig(src, overwrite=overwrite, provenance=provenance(src),
                       **given(out_dir=data_dir, out=out, name=name, dtype=dtype))
    click.echo(f"wrote {run(cfg)}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Report folder to write  [default: PATH/report]")
@click.option("--metadata", type=click.Path(path_type=Path),
              help="mtgc.csv with the runs' labels, for PR curves  [default: the one in each run's config.json]")
@errors
def report(path: Path, out: Path | None, metadata: Path | None) -> None:
    """Plots and an HTML page for a run directory (train) or a results folder (reproduce)."""
    from trailers12k_feats.apps.report import write_report

    click.echo(f"report written to {write_report(path, out, metadata)}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True)
@option(DEMO, "--trailers", type=int, help="Synthetic trailer videos to make.")
@option(DEMO, "--max-epochs", type=int, help="Epoch limit per run.")
@option(DEMO, "--seed", type=int, help="Seed of the videos, labels, splits and heads.")
@errors
def demo(out: Path, **opts) -> None:
    """The whole pipeline: synthetic trailer videos -> extraction (real ImageNet MobileNetV2 and a
    3D ShuffleNet) -> image, video and fusion heads -> results, plots -> genres of a held-out video."""
    from trailers12k_feats.apps.demo import DemoConfig, format_result, run

    click.echo(format_result(run(out, DemoConfig(**given(**opts)))))


if __name__ == "__main__":
    sys.exit(main())
