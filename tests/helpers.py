"""Test models and clips shared by the test modules (import them from here, not conftest)."""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """SE block with two Linear layers."""

    def __init__(self, channels: int, hidden: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * w[:, :, None, None]


class AllLayersNet(nn.Module):
    """Every supported layer type: Conv1d/2d/3d, ConvTranspose2d, Linear, with groups, dilation,
    stride, BatchNorm, a residual add, a concat, an SE block and a dict output."""

    def __init__(self, in_channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.grouped = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2)
        self.conv3d = nn.Conv3d(12, 12, (1, 3, 3), padding=(0, 1, 1))
        self.conv1d = nn.Conv1d(12, 12, 3, padding=1)
        self.se = SqueezeExcite(12)
        self.up = nn.ConvTranspose2d(12, 8, 4, stride=2, padding=1)
        self.head = nn.Conv2d(16, classes, 1)
        self.token = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = torch.relu(self.bn(self.stem(x)))
        a = a + torch.relu(self.depthwise(a))
        b = torch.relu(self.grouped(a))
        b = b + self.conv3d(b.unsqueeze(2)).squeeze(2)
        n, c, h, w = b.shape
        b = b + self.conv1d(b.flatten(2)).view(n, c, h, w)
        b = self.se(b)
        tokens = self.token(b.flatten(2).transpose(1, 2))
        seg = self.head(torch.cat([a, torch.relu(self.up(b))], dim=1))
        return {"seg": seg, "tokens": tokens}


def make_all_layers_net(seed: int = 0) -> AllLayersNet:
    """An AllLayersNet in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = AllLayersNet().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
    return net


def make_clip(batch: int = 2, frames: int = 12, channels: int = 3, size: int = 16,
              seed: int = 0, drift: float = 0.1) -> torch.Tensor:
    """A temporally coherent random clip ``[B, T, C, H, W]``: a base frame plus a random walk
    with steps of standard deviation ``drift``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 1, channels, size, size, generator=g)
    walk = drift * torch.randn(batch, frames, channels, size, size, generator=g).cumsum(1)
    return base + walk


def bits_per_mac(scheme: str, period: int = 1) -> float:
    """Mean ``b_w * b_a`` per MAC over one keyframe period of a static scheme (from the
    notation, as the paper counts BOPs)."""
    import resq_brevitas as resq

    parsed = resq.Scheme.parse(scheme)
    key = parsed.keyframe.bops_weight_bits * parsed.keyframe.bops_act_bits
    if parsed.residual is None:
        return float(key)
    res = parsed.residual.bops_weight_bits * parsed.residual.bops_act_bits
    return (key + (period - 1) * res) / period


def relative_bops(scheme: str, period: int = 1, reference: str = "W8A8") -> float:
    """BOPs of ``scheme`` at ``period`` relative to frame quantization at ``reference``."""
    return bits_per_mac(scheme, period) / bits_per_mac(reference)


class TwoInputFlowNet(nn.Module):
    """A flow-style model ``forward(image1, image2)`` (RAFT-like inputs): one encoder per
    image, a fused decoder, and a tuple output ``(flow at 1/2 resolution, upsampled flow)``."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.enc2 = nn.Conv2d(channels, 8, 3, padding=1)
        self.fuse = nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.flow = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.cat([torch.relu(self.enc1(image1)), torch.relu(self.enc2(image2))], 1)
        low = self.flow(torch.relu(self.fuse(f)))
        return low, 2 * nn.functional.interpolate(low, scale_factor=2.0, mode="nearest")


class MaskGuidedSegNet(nn.Module):
    """A video-object-segmentation-style model ``forward(frame, mask)`` (keyword inputs: an
    image ``[B, C, H, W]`` and a one-channel mask) with a nested dict output
    ``{"out": segmentation, "aux": {"score": per-object score from a Linear}}``."""

    def __init__(self, channels: int = 3, classes: int = 2) -> None:
        super().__init__()
        self.image = nn.Conv2d(channels, 8, 3, padding=1)
        self.mask = nn.Conv2d(1, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, classes, 1)
        self.score = nn.Linear(8, 1)

    def forward(self, frame: torch.Tensor, mask: torch.Tensor) -> dict:
        h = torch.relu(self.mix(torch.relu(self.image(frame)) + torch.relu(self.mask(mask))))
        return {"out": self.head(h), "aux": {"score": self.score(h.mean((2, 3)))}}


class SlidingClip3DNet(nn.Module):
    """A 3D-CNN clip classifier (r3d-like): each "frame" of the stream is a sliding clip
    ``[C, T', H, W]`` of ``T'`` video frames; output logits ``[B, classes]``."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv3d(channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm3d(8)
        self.temporal = nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0))
        self.spatial = nn.Conv3d(8, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn(self.stem(x)))
        a = a + torch.relu(self.temporal(a))
        a = torch.relu(self.spatial(a))
        return self.fc(a.mean((2, 3, 4)))


def make_sliding_clips(batch: int = 2, clips: int = 6, window: int = 4, channels: int = 3,
                       size: int = 16, seed: int = 0, drift: float = 0.1) -> torch.Tensor:
    """A stream of sliding clips ``[B, N, C, T', H, W]``: window ``n`` holds video frames
    ``n .. n + T' - 1`` of a coherent video (:func:`make_clip`)."""
    video = make_clip(batch, clips + window - 1, channels, size, seed, drift)
    windows = torch.stack([video[:, n:n + window] for n in range(clips)], 1)
    return windows.transpose(2, 3).contiguous()  # [B, N, T', C, H, W] -> [B, N, C, T', H, W]


def make_two_input_clip(batch: int = 2, frames: int = 6, size: int = 16, seed: int = 0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image1, image2)`` clips of a flow model: consecutive frames of one video."""
    video = make_clip(batch, frames + 1, 3, size, seed)
    return video[:, :-1].contiguous(), video[:, 1:].contiguous()


def make_mask_clip(batch: int = 2, frames: int = 6, size: int = 16, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """``{"frame": [B, T, 3, H, W], "mask": [B, T, 1, H, W]}`` clips of a VOS model."""
    video = make_clip(batch, frames, 4, size, seed)
    return {"frame": video[:, :, :3].contiguous(),
            "mask": torch.sigmoid(video[:, :, 3:]).contiguous()}


class TinySegNet(nn.Module):
    """Two convolutions, a ReLU and a Linear on pooled features: a training test's model."""

    def __init__(self, in_channels: int = 3, hidden: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, classes, 3, padding=1)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        return self.conv2(a) + self.fc(a.mean((2, 3)))[:, :, None, None]


def make_tiny_segnet(seed: int = 0) -> TinySegNet:
    """A TinySegNet in eval mode with seeded weights."""
    torch.manual_seed(seed)
    return TinySegNet().eval()


def force_policy(qm: nn.Module, action: int, scale: float = 50.0) -> None:
    """Make a family model's policy head pick ``action`` whatever the frame."""
    with torch.no_grad():
        qm.frame_policy.head.weight.zero_()
        qm.frame_policy.head.bias.zero_()
        qm.frame_policy.head.bias[action] = scale


def scramble_policy(qm: nn.Module, video: torch.Tensor, seed: int = 1) -> None:
    """A random head on the standardised hidden states of ``video``: the frames' small
    differences (and the carried LSTM state) decide, so rows and frames take different
    actions."""
    g = torch.Generator().manual_seed(seed)
    policy = qm.frame_policy
    with torch.no_grad():
        state, hidden = None, []
        for t in range(video.shape[1]):
            _, state = policy(video[:, t], state)
            hidden.append(state[0])
        h = torch.cat(hidden)
        weight = torch.randn(policy.head.weight.shape, generator=g) / h.std(0).clamp_min(1e-6)
        policy.head.weight.copy_(weight)
        policy.head.bias.copy_(-(h @ weight.T).mean(0))
