"""3D ShuffleNet-V2 1.0x (Kopuklu et al., "Resource Efficient 3D CNNs") and its checkpoint loader.

Module names follow the Efficient-3DCNNs code (including its spelling `banch`), so their
Kinetics checkpoints load key for key once the DataParallel `module.` prefix is removed.
Input (N, 3, T, H, W), pixel values 0-255 minus the ActivityNet mean with std 1; any T and any
H, W divisible by 16 (trained at 112x112). Output of the trunk: a 1024-d clip embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import VideoClassification

from trailers12k_feats.utils import T12kError

ACTIVITYNET_MEAN = (114.7748, 107.7354, 99.4750)  # on the 0-255 scale


def transforms() -> VideoClassification:
    """The checkpoints' test-time preprocessing, in torchvision's video transform.

    Efficient-3DCNNs scales the shorter side to 112, centre-crops 112x112 and subtracts the
    mean on the 0-255 scale with std 1; on torchvision's 0-1 scale that is mean/255, std 1/255.
    """
    return VideoClassification(crop_size=(112, 112), resize_size=(112,),
                               mean=tuple(m / 255 for m in ACTIVITYNET_MEAN), std=(1 / 255,) * 3,
                               interpolation=InterpolationMode.BILINEAR)


def _conv_bn_relu(inp: int, out: int, k: int, stride=1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers = [nn.Conv3d(inp, out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm3d(out)]
    return layers + ([nn.ReLU(inplace=True)] if relu else [])


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    N, C, T, H, W = x.shape
    return x.view(N, groups, C // groups, T, H, W).transpose(1, 2).reshape(N, C, T, H, W)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = out // 2
        if stride == 2:
            # depthwise 3x3x3 + BN (.0/.1), pointwise + BN + ReLU (.2/.3/.4)
            self.banch1 = nn.Sequential(*_conv_bn_relu(inp, inp, 3, stride, groups=inp, relu=False),
                                        *_conv_bn_relu(inp, half, 1))
        cin = inp if stride == 2 else half
        # pointwise + BN + ReLU (.0/.1/.2), depthwise + BN (.3/.4), pointwise + BN + ReLU (.5/.6/.7)
        self.banch2 = nn.Sequential(*_conv_bn_relu(cin, half, 1),
                                    *_conv_bn_relu(half, half, 3, stride, groups=half, relu=False),
                                    *_conv_bn_relu(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.banch2(x2)), 1)
        else:
            out = torch.cat((self.banch1(x), self.banch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2_3D(nn.Module):
    """ShuffleNet-V2 1.0x in 3D: stages of 4, 8, 4 blocks with 116, 232, 464 channels."""

    def __init__(self, num_classes: int = 600) -> None:
        super().__init__()
        channels = (24, 116, 232, 464, 1024)
        self.conv1 = nn.Sequential(*_conv_bn_relu(3, channels[0], 3, (1, 2, 2)))
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        blocks, cin = [], channels[0]
        for repeats, cout in zip((4, 8, 4), channels[1:4]):
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, 2 if i == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*blocks)
        self.conv_last = nn.Sequential(*_conv_bn_relu(cin, channels[4], 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(channels[4], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, 24, T, H/2, W/2)
        x = self.maxpool(x)  # (N, 24, T/2, H/4, W/4)
        x = self.features(x)  # (N, 464, T/16, H/32, W/32)
        x = self.conv_last(x)  # (N, 1024, ...)
        x = x.mean(dim=(2, 3, 4))  # (N, 1024) global average over time and space
        return self.classifier(x)


def load_efficient3dcnns(model: ShuffleNetV2_3D, checkpoint: dict) -> None:
    """Load an Efficient-3DCNNs checkpoint (`{epoch, arch, state_dict, ...}`, DataParallel keys).

    The classifier is skipped (features only), so a Kinetics-400 or -600 checkpoint both load;
    every other weight must be present with the right shape.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise T12kError("checkpoint is not a dict with a 'state_dict'; expected an Efficient-3DCNNs .pth file.")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("classifier.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise T12kError(f"checkpoint does not match 3D ShuffleNet-V2 1.0x: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                        f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}.")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise T12kError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}.")
    model.load_state_dict(state, strict=False)
