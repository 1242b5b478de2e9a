"""A small float segmentation network used by the embedded demo.

``DemoSegNet`` deliberately mixes the layer types a video backbone typically contains
(strided, depthwise, dilated and transposed convolutions, BatchNorm, a residual add,
squeeze-excitation with ``nn.Linear`` and channel concatenations) so that quantization and
conversion code paths are all exercised by one tiny model. It is plain ``torch.nn``; the
quantized variant is produced by the package's conversion utilities.

Like MobileNetV2 it uses ReLU6 after every BatchNorm, and like the decoders of DeepLabV3+ or a
U-Net every decoder conv is followed by BatchNorm. Without them the decoder's activations had
no scale control (the head's input reached 83, ten times the stem features concatenated with
it under one per-tensor range) and the SE block's pooled inputs no bound; with them W8A8 frame
quantization went from 26.3 to 29.4 dB output SQNR (benchmarks/RESULTS.md section 8).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["CHECKPOINT_PATH", "FRAME_SIZE", "NUM_CLASSES", "DemoSegNet", "load_demo_model"]

#: Number of segmentation classes of the demo (background, disc, rectangle, triangle).
NUM_CLASSES: int = 4
#: Frame height and width the shipped checkpoint was trained on.
FRAME_SIZE: int = 64
#: Location of the shipped float checkpoint (a ``state_dict``).
CHECKPOINT_PATH: Path = Path(__file__).with_name("segnet.pt")


def _conv_bn_relu(
    in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size=3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class SqueezeExcitation(nn.Module):
    """Channel attention: global average pool, bottleneck MLP, sigmoid channel scale.

    Args:
        channels: Number of input/output channels.
        reduced: Hidden width of the bottleneck.
    """

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, reduced)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(reduced, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        """Scale each channel of ``x`` ([B, C, H, W]) by a learned gate."""
        s = x.mean(dim=(2, 3))
        s = self.gate(self.fc2(self.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class DepthwiseSeparableResidual(nn.Module):
    """``x + pointwise(depthwise(x))``: a MobileNet-style block with an identity shortcut.

    Args:
        channels: Number of input/output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU6(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block with its residual add."""
        return x + self.block(x)


class DemoSegNet(nn.Module):
    """Tiny U-Net-like per-frame segmentation network.

    Encoder: stem (stride 1, 16 ch) -> stride-2 conv (32 ch) -> depthwise-separable residual
    block -> squeeze-excitation -> stride-2 conv (48 ch) -> dilated conv. Decoder: two
    ``ConvTranspose2d`` upsamplings (each with BatchNorm and ReLU6), each followed by
    concatenation with the encoder features of the same resolution (a 1x1 fusion conv with
    BatchNorm and ReLU6 after the first), then a 1x1 classifier.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input channels.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = _conv_bn_relu(in_channels, 16)
        self.down1 = _conv_bn_relu(16, 32, stride=2)
        self.dw_block = DepthwiseSeparableResidual(32)
        self.se = SqueezeExcitation(32, 8)
        self.down2 = _conv_bn_relu(32, 48, stride=2)
        self.context = _conv_bn_relu(48, 48, dilation=2)
        self.up1 = nn.ConvTranspose2d(48, 32, kernel_size=4, stride=2, padding=1, bias=False)
        self.up1_bn = nn.BatchNorm2d(32)
        self.up1_act = nn.ReLU6(inplace=True)
        # A 1x1 fusion keeps the model small; spatial refinement comes from the transposed convs.
        self.fuse1 = nn.Conv2d(64, 32, kernel_size=1, bias=False)
        self.fuse1_bn = nn.BatchNorm2d(32)
        self.fuse1_act = nn.ReLU6(inplace=True)
        self.up2 = nn.ConvTranspose2d(32, 16, kernel_size=4, stride=2, padding=1, bias=False)
        self.up2_bn = nn.BatchNorm2d(16)
        self.up2_act = nn.ReLU6(inplace=True)
        self.head = nn.Conv2d(32, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Segment a batch of frames.

        Args:
            x: ``[B, 3, H, W]`` normalised frames, ``H`` and ``W`` multiples of 4.

        Returns:
            ``[B, num_classes, H, W]`` logits.
        """
        if x.dim() != 4 or x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(
                f"x must be [B, C, H, W] with H and W multiples of 4, got {tuple(x.shape)}"
            )
        f1 = self.stem(x)
        f2 = self.se(self.dw_block(self.down1(f1)))
        f3 = self.context(self.down2(f2))
        u1 = self.up1_act(self.up1_bn(self.up1(f3)))
        u1 = self.fuse1_act(self.fuse1_bn(self.fuse1(torch.cat([u1, f2], dim=1))))
        u2 = self.up2_act(self.up2_bn(self.up2(u1)))
        return self.head(torch.cat([u2, f1], dim=1))


def load_demo_model(path: str | Path | None = None) -> DemoSegNet:
    """Load the shipped (or a given) float checkpoint into a ``DemoSegNet`` in eval mode.

    Args:
        path: Checkpoint (``state_dict``) path; defaults to the packaged ``segnet.pt``.

    Returns:
        The model on CPU, in eval mode.

    Raises:
        FileNotFoundError: If the checkpoint does not exist.
    """
    path = CHECKPOINT_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"demo checkpoint not found at {path}; train one with `python recipes/train_demo.py`"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = DemoSegNet()
    model.load_state_dict(state)
    return model.eval()
