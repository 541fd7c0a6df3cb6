"""click options whose defaults live in the config dataclasses, looked up only when needed.

An option made with `option` is None unless given; `given` drops the Nones, so a config
built from the options keeps its own defaults, and help shows them. Configs and choice lists
are named as `module:name` references and imported when help is printed or a value is checked,
so `t12k` imports a command's modules only when that command runs. The parsers of option
values (`ints`, `names`, `shard_spec`, `weight_pairs`), the option groups several
commands share (`data_options`, `train_options`, ...) and the long option lists of single
commands (`extract_options`) live here too, so `cli.py` holds only the commands.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from pathlib import Path
from typing import Any

import click

from trailers12k_feats.utils import T12kError


def load_ref(ref: str) -> Any:
    """The object that `module:name` names, imported now."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def default(config: str | type, name: str) -> Any:
    """The default of field `name` of a config dataclass (a class or a `module:Class` reference)."""
    cls = load_ref(config) if isinstance(config, str) else config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise KeyError(f"{cls.__name__} has no field {name!r}; fields: {', '.join(fields)}")
    f = fields[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def show(value: Any) -> str:
    """A default as help prints it: 1e-4 as 0.0001, 24.0 as 24, tuples comma-separated."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ", ".join(show(v) for v in value)
    return str(value)


class ConfigOption(click.Option):
    """An option for a config field: None unless given; help ends with the field's default.

    `shown`, a `module:function` reference, describes a default that the field leaves to
    something else (a None threshold is each shot detector's own).
    """

    def __init__(self, *decls: Any, config: str, field: str | None = None, shown: str | None = None,
                 **kw: Any) -> None:
        super().__init__(*decls, **kw)
        self.config, self.field, self.shown = config, field or self.name, shown

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        spec, text = record
        value = load_ref(self.shown)() if self.shown else show(default(self.config, self.field))
        return spec, f"{text}  [default: {value}]"


def option(config: str, *decls: str, field: str | None = None, shown: str | None = None, **kw: Any):
    """click.option for field `field` (the option's name by default) of the dataclass `config`."""
    return click.option(*decls, cls=ConfigOption, config=config, field=field, shown=shown, **kw)


class LazyChoice(click.Choice):
    """click.Choice over a tuple of the package (`module:NAME`), imported when first needed."""

    def __init__(self, ref: str) -> None:  # click.Choice.__init__ would need the choices now
        self.ref, self.case_sensitive = ref, True

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(load_ref(self.ref))


def given(**values: Any) -> dict[str, Any]:
    """The options that were given: None means "left out", so the config's default applies."""
    return {k: v for k, v in values.items() if v is not None}


# The parsers and the option groups the commands share.

DATA_DIR = Path("cache")  # where `t12k download` puts mtgc.csv and the caches, and where commands look

# The config dataclasses behind the options, as module:Class references imported on demand.
TRAIN = "trailers12k_feats.training.train:TrainConfig"
TRAIN_JOB = "trailers12k_feats.training.train:TrainJob"
REPRODUCE = "trailers12k_feats.training.reproduce:ReproduceConfig"
PROBE = "trailers12k_feats.training.probe:ProbeConfig"
EXTRACT = "trailers12k_feats.extraction.extract:ExtractConfig"
CLIP = "trailers12k_feats.extraction.video:ClipSpec"
PREDICT = "trailers12k_feats.apps.predict:PredictConfig"
DEMO = "trailers12k_feats.apps.demo:DemoConfig"
SYNTH = "trailers12k_feats.sources.synthetic:SynthConfig"
DOWNLOAD = "trailers12k_feats.sources.download:DownloadConfig"
IMPORT = "trailers12k_feats.sources.zarr_import:ImportConfig"


# --precision of training and extraction; its choices and default come from the configs.
AUTO_HELP = ("Autocast precision; auto: bf16 on CUDA, and on the CPU bf16 only where a matmul probe (run once per "
             "machine and cached) finds it faster than fp32.")


def ints(text: str | None) -> tuple[int, ...] | None:
    """"0,1,2" -> (0, 1, 2); None stays None (left out)."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def names(text: str | None) -> tuple[str, ...] | None:
    """"a, b" -> ("a", "b"); None or "" stays None (left out)."""
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


def errors(fn):
    """Turn a T12kError into one clear line and exit status 1, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except T12kError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def stacked(opts: list, fn):
    """`fn` under every decorator of `opts`, the first outermost: --help lists them in `opts`' order."""
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


# Decoding processes of extraction, as ExtractConfig and PredictConfig default them.
WORKERS_DEFAULT = "[default: 0 on the CPU, the usable cores but one with CUDA]"


def data_options(config: str):
    """--data-dir, or --metadata and --cache-dir separately; --on-missing of `config`."""
    def deco(fn):
        fn = option(config, "--on-missing", type=click.Choice(["error", "warn"]),
                    help="Trailers of the metadata missing from a cache: stop, or warn and drop them.")(fn)
        fn = click.option("--cache-dir", type=click.Path(path_type=Path),
                          help="Folder of <stream>.h5 caches  [default: DATA_DIR]")(fn)
        fn = click.option("--metadata", type=click.Path(path_type=Path),
                          help="Labels and splits file  [default: DATA_DIR/mtgc.csv]")(fn)
        fn = click.option("--data-dir", type=click.Path(path_type=Path), default=DATA_DIR, show_default=True,
                          help="Folder holding mtgc.csv and the <stream>.h5 caches.")(fn)
        return fn
    return deco


def clips_option(fn):
    """--allow-mismatched-clips."""
    return click.option("--allow-mismatched-clips", is_flag=True,
                        help="Fuse two streams even if their fps, fpc or segmentation differ.")(fn)


def resolve_data(data_dir: Path, metadata: Path | None, cache_dir: Path | None) -> tuple[Path, Path]:
    """(metadata file, cache folder): those given, else DATA_DIR/mtgc.csv and DATA_DIR."""
    return metadata or data_dir / "mtgc.csv", cache_dir or data_dir


def _train_opts(grid: bool) -> list:
    """TrainConfig's options; with `grid`, those a grid may vary (training/grid.py) take comma lists."""
    def listed(decls: tuple[str, ...], kind: Any, text: str, example: str) -> Any:
        if not grid:
            return option(TRAIN, *decls, type=kind, help=text)
        return option(TRAIN, *decls, help=f"{text} A comma list ({example}) makes a grid: one results folder "
                                          f"per setting.")
    return [
        listed(("--temporal",), LazyChoice("trailers12k_feats.training.heads:TEMPORAL"),
               "Temporal module (tsfm, savg, gru, conv).", "tsfm,gru"),
        listed(("--fusion",), LazyChoice("trailers12k_feats.training.heads:FUSIONS"), "Fusion of two streams.",
               "late,early"),
        listed(("--max-epochs",), int, "Epoch limit.", "50,100"),
        listed(("--batch-size",), int, "Trailers per batch.", "16,32"),
        listed(("--lr",), float, "AdamW learning rate.", "1e-4,3e-4"),
        listed(("--seed", "--seeds") if grid else ("--seed",), int, "Seed of weights, windows and dropout.",
               "0,1,2"),
        option(TRAIN, "--precision", type=LazyChoice("trailers12k_feats.training.train:TRAIN_PRECISIONS"),
               help=AUTO_HELP),
        option(TRAIN, "--device", help="cpu or cuda[:N]."),
    ]


def train_options(fn):
    """Options of TrainConfig; unset ones keep the config's defaults (the paper's protocol)."""
    return stacked(_train_opts(grid=False), fn)


def grid_train_options(fn):
    """train_options whose grid fields (training/grid.py) take comma lists, as strings."""
    return stacked(_train_opts(grid=True), fn)


def protocol_option(config: str):
    """--protocol, its default read from `config` (TrainConfig for train, ReproduceConfig for reproduce)."""
    return option(config, "--protocol", type=LazyChoice("trailers12k_feats.training.protocols:PROTOCOLS"),
                  help="authors: as the authors' code (zero padding seen as clips, snippet-level validation "
                       "loss, training trailers under 30 clips left out); masked: padding masked everywhere.")


def shot_options(fn):
    """--shots, --shot-threshold and --min-shot-frames of ClipSpec."""
    opts = [
        option(CLIP, "--shots", type=LazyChoice("trailers12k_feats.extraction.shots:SHOTS"),
               help="Shot detector: content or adaptive (PySceneDetect, hard cuts), transnetv2 (cuts, dissolves, "
                    "fades); auto: transnetv2 on CUDA, content on the CPU."),
        option(CLIP, "--shot-threshold", type=float, shown="trailers12k_feats.extraction.shots:threshold_defaults",
               help="Threshold of the chosen --shots detector."),
        option(CLIP, "--min-shot-frames", type=int, help="content, adaptive: minimum frames between cuts."),
    ]
    return stacked(opts, fn)


def extract_options(fn):
    """The options of `t12k extract` but --engine and its Ray options (`engine_options`): the backbones,
    the cache folder, ClipSpec's and ExtractConfig's fields, decoding workers, shard and weights."""
    opts = [
        click.option("-b", "--backbone", "backbones", multiple=True, required=True,
                     help="Backbone to run (repeat for several); `t12k backbones` lists them, or timm:<model>."),
        click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=DATA_DIR, show_default=True,
                     help="Folder of the <stream>.h5 caches to write or extend."),
        option(CLIP, "--fps", type=float, help="Frames per second after resampling."),
        option(CLIP, "--fpc", type=int, help="Frames per clip."),
        option(CLIP, "--segmentation", type=LazyChoice("trailers12k_feats.extraction.video:SEGMENTATIONS"),
               help="Clips within shots, or ignore cuts."),
        option(CLIP, "--leftover", type=LazyChoice("trailers12k_feats.extraction.video:LEFTOVERS"),
               help="Shot remainder shorter than a clip."),
        shot_options,
        option(EXTRACT, "--frame-pool", type=LazyChoice("trailers12k_feats.extraction.extract:FRAME_POOLS"),
               help="2D backbones: clip = mean of frames or centre frame."),
        option(EXTRACT, "--image-frames", type=int,
               help="2D backbones: frames embedded per clip, evenly spaced; 0 = all."),
        option(EXTRACT, "--precision", type=LazyChoice("trailers12k_feats.extraction.extract:EXTRACT_PRECISIONS"),
               help=AUTO_HELP + " fp16 needs CUDA."),
        option(EXTRACT, "--device", help="cpu or cuda[:N]."),
        option(EXTRACT, "--batch-size", type=int, help="Clips per forward pass."),
        click.option("--workers", type=int, help=f"Decoding processes; 0 decodes in the main process  {WORKERS_DEFAULT}"),
        click.option("--shard",
                     help="K/N: process every N-th video starting at the K-th (merge with `t12k cache merge`)."),
        click.option("--weights", "weights", multiple=True,
                     help="NAME=PATH of a weight file, or NAME=random (repeatable)."),
        click.option("--random-weights", is_flag=True, default=None,
                     help="Random weights for every backbone (smoke tests)."),
        option(EXTRACT, "--flush-every", "flush_trailers", field="flush_trailers", type=int,
               help="Save finished trailers every N trailers."),
        option(EXTRACT, "--partial", type=LazyChoice("trailers12k_feats.extraction.extract:PARTIALS"),
               help="A video that decodes shorter than its file declares (by more than 1 s and 5%; truncated): "
                    "keep its clips in the cache or drop it; either way it is listed in failures.jsonl."),
    ]
    return stacked(opts, fn)


def download_options(fn):
    """The options of `t12k download`: DownloadConfig's fields, what to fetch and whether to import it."""
    opts = [
        option(DOWNLOAD, "--data-dir", type=click.Path(path_type=Path),
               help="Folder to fill: mtgc.csv, one <stream>.h5 cache per stream, downloads under released/."),
        click.option("--only", multiple=True, metavar="NAME",
                     help="Fetch only these (repeat or comma-separate): mtgc, a stream name, or a file name  "
                          "[default: every file of the release]"),
        option(DOWNLOAD, "--base-url", envvar="T12K_BASE_URL",
               help="A mirror: a URL containing {file}, or a folder URL the file names are appended to (env "
                    "T12K_BASE_URL)."),
        click.option("--no-import", is_flag=True,
                     help="Download, verify and unpack the zarr stores; do not import them."),
        click.option("--keep-zarr", is_flag=True, help="Keep the unpacked zarr stores after importing them."),
        option(DOWNLOAD, "--dtype", type=click.Choice(["float16", "float32"]), help="Dtype of the imported caches."),
        option(DOWNLOAD, "--timeout", type=float, help="Seconds without data before a connection counts as failed."),
        option(DOWNLOAD, "--retries", type=int, help="Further attempts after a failed transfer, each resuming it."),
        option(DOWNLOAD, "--max-size-factor", type=float,
               help="Multiply the size bounds of each download and of unpacking (a mirror that repackages the "
                    "files)."),
    ]
    return stacked(opts, fn)


def shard_spec(text: str | None) -> tuple[int, int] | None:
    """"K/N" -> (K, N); None stays None."""
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected K/N such as 2/4, got {text!r}") from None
    return k, n


def weight_pairs(items: tuple[str, ...]) -> tuple[tuple[str, str], ...] | None:
    """("NAME=PATH", ...) -> ((NAME, PATH), ...); None when none are given."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH (or NAME=random), got {item!r}")
        out.append((name, path))
    return tuple(out) or None


def rows_splits(config: str):
    """--rows and --splits of `config`."""
    def deco(fn):
        fn = option(config, "--splits", help="Comma-separated splits.")(fn)
        return option(config, "--rows", help="Comma-separated Table 6 rows.")(fn)
    return deco


# --engine and the Ray options; the command gets them as one EngineConfig, `engine`.
ENGINE = "trailers12k_feats.engines:EngineConfig"
RAY_HELP = ("Ray: the cluster to use: auto joins the one this machine is part of (`ray start`), HOST:PORT its head, "
            "ray://HOST:PORT through Ray Client  [default: a Ray instance started for the run]")


def engine_options(*extra: str):
    """--engine, --ray-address and the Ray options named in `extra` (EngineConfig fields), gathered into
    one `engine` argument; a run with --engine ray imports Ray only then."""
    helps = {
        "decode_cpus": (float, "Ray: CPUs of each decoding task (decoding, shot cuts, clipping, cropping)."),
        "gpus_per_actor": (float, ("Ray: GPUs of each model actor; 0 runs the models on CPUs  "
                                   "[default: 1 when the cluster has GPUs, else 0]")),
        "actors": (int, ("Ray: model actors, each loading the backbones once; 0: one per GPU (per "
                         "--gpus-per-actor), or half the CPUs without GPUs.")),
        "actor_cpus": (float, "Ray: CPUs of each model actor (its torch threads on the CPU)."),
        "cpus_per_run": (float, ("Ray: CPUs of each training task (a run, or the splits of a row trained as "
                                 "a group); its torch threads.")),
    }

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            from trailers12k_feats.engines import EngineConfig

            values = {"engine": kw.pop("engine"), "address": kw.pop("ray_address")}
            values.update({name: kw.pop(name) for name in extra})
            return fn(*args, engine=EngineConfig(**given(**values)), **kw)

        for name in reversed(extra):
            if name == "ordered":
                wrapper = click.option("--ordered/--any-order", default=None, help=(
                    "Ray: batch the trailers' clips in input order, as the local engine (bit-equal fp32 "
                    "features), or as decoding delivers them (faster on many nodes: no trailer waits for an "
                    "earlier one)  [default: ordered with CPU actors, any order with GPUs]"))(wrapper)
                continue
            kind, text = helps[name]
            if name == "gpus_per_actor":
                wrapper = click.option("--gpus-per-actor", type=kind, help=text)(wrapper)
            else:
                wrapper = option(ENGINE, "--" + name.replace("_", "-"), type=kind, help=text)(wrapper)
        wrapper = click.option("--ray-address", help=RAY_HELP)(wrapper)
        return option(ENGINE, "--engine", type=LazyChoice("trailers12k_feats.engines:ENGINES"),
                      help="local: in this process; ray: on a Ray cluster (`pip install "
                           "'trailers12k_feats[ray]'`).")(wrapper)
    return deco
