"""Argument validators, written once and used by every entry point.

Each raises ``TypeError`` for a value of the wrong type and ``ValueError`` for a value out of
range, naming the argument, what was expected and what was received.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_choice",
    "check_frame",
    "check_int",
    "check_period",
    "check_real",
    "check_tensor",
]


def check_int(value: Any, name: str, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """An ``int`` (not a ``bool``) within ``[minimum, maximum]``.

    Raises:
        TypeError: If ``value`` is not an int.
        ValueError: If it is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be {minimum}..{maximum}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_period(period: Any, name: str = "period") -> int:
    """A keyframe period ``T``: an int >= 1."""
    return check_int(period, name, minimum=1)


def check_real(value: Any, name: str, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real number ``>= minimum`` (``> minimum`` when ``strict``), as ``float``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is not finite or below the bound.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    low_ok = value > minimum if strict else value >= minimum
    if not math.isfinite(value) or not low_ok:
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """A real ``bool`` (a truthy string such as ``"no"`` is refused).

    Raises:
        TypeError: If ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings).

    Raises:
        ValueError: If ``value`` is not one of them.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_frame(frame: Any, name: str = "frame", spec: tuple[int, int] | None = None,
                stream_shape: tuple[int, ...] | None = None) -> None:
    """Raise a clear error if ``frame`` is not a batch of frames ``[B, C, ...]`` that fits.

    Args:
        frame: The value to check.
        name: Argument name for messages.
        spec: ``(rank incl. batch, channels)`` the model expects, if known.
        stream_shape: The shape of the stream's earlier frames, if a stream is running.

    Raises:
        TypeError: Not a floating-point tensor.
        ValueError: Wrong rank, channels, empty batch, a shape change mid-stream, NaN or Inf.
    """
    if not isinstance(frame, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, C, ...], got {type(frame).__name__}")
    if not frame.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {frame.dtype}")
    if frame.dim() < 2:
        raise ValueError(f"{name} must be [B, C, ...] (rank >= 2), got shape {tuple(frame.shape)}")
    if frame.shape[0] == 0:
        raise ValueError(
            f"{name} must have at least one batch row, got shape {tuple(frame.shape)}"
        )
    if spec is not None:
        rank, channels = spec
        if frame.dim() != rank:
            raise ValueError(
                f"{name} must have rank {rank} ([B, C, ...]), got rank {frame.dim()} "
                f"(shape {tuple(frame.shape)})"
            )
        if frame.shape[1] != channels:
            raise ValueError(
                f"{name} must have {channels} channels (dim 1), got {frame.shape[1]} "
                f"(shape {tuple(frame.shape)})"
            )
    if stream_shape is not None and tuple(frame.shape) != stream_shape:
        raise ValueError(
            f"{name} shape changed mid-stream: expected {stream_shape}, got "
            f"{tuple(frame.shape)}; call reset() to start a new stream"
        )
    if not bool(torch.isfinite(frame).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_tensor(value: Any, name: str, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, rank: int | None = None,
                 min_rank: int = 1, channels: int | None = None, channel_dim: int = 1,
                 layout: str = "[B, C, ...]", source: str | None = None) -> Tensor:
    """A non-empty floating-point tensor of the model's dtype and device, rank and channels.

    Finite values are not checked here (a full pass over the data; callers do it last).

    Args:
        value: The value to check.
        name: Argument name for messages.
        dtype: The dtype it must have.
        device: The device it must be on.
        rank: The rank it must have (``None``: any rank ``>= min_rank``).
        min_rank: The smallest rank accepted.
        channels: The size ``channel_dim`` must have.
        channel_dim: Where the channels are.
        layout: The expected layout, for messages.
        source: What the expectation was read off (a layer name), for messages.

    Raises:
        TypeError: Not a floating-point tensor, or another dtype or device.
        ValueError: Wrong rank or channels, or empty.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have the model's dtype {dtype}, got {value.dtype}; "
                        f"convert the frames (or the model with .to())")
    if device is not None and value.device != device:
        raise TypeError(f"{name} must be on the model's device {device}, got {value.device}")
    by = f" (read off layer {source!r})" if source else ""
    shape = tuple(value.shape)
    if rank is not None and value.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}){by}, got rank {value.dim()} "
                         f"(shape {shape})")
    if value.dim() < min_rank:
        raise ValueError(f"{name} must be {layout} (rank >= {min_rank}), got shape {shape}")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {shape}")
    if channels is not None and value.shape[channel_dim] != channels:
        raise ValueError(f"{name} must have {channels} channels (dim {channel_dim}){by}, got "
                         f"{value.shape[channel_dim]} (shape {shape})")
    return value
