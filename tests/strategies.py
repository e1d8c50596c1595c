"""One bounded hypothesis strategy for a whole 2-D conv geometry, reused by every test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from hypothesis import strategies as st

PaddingSpec = Union[str, int, tuple[int, int]]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class ConvGeometry:
    """Everything that defines one conv call, plus the input size."""

    batch: int
    in_per_group: int
    out_per_group: int
    groups: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: PaddingSpec
    padding_mode: str
    bias: bool

    @property
    def in_channels(self) -> int:
        return self.in_per_group * self.groups

    @property
    def out_channels(self) -> int:
        return self.out_per_group * self.groups

    def explicit_padding(self) -> tuple[int, int, int, int]:
        fh = self.dilation[0] * (self.kernel[0] - 1)
        fw = self.dilation[1] * (self.kernel[1] - 1)
        if self.padding == "valid":
            return 0, 0, 0, 0
        if self.padding == "same":
            return fh // 2, fh - fh // 2, fw // 2, fw - fw // 2
        ph, pw = (self.padding, self.padding) if isinstance(self.padding, int) else self.padding
        return ph, ph, pw, pw

    def conv(self, dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.nn.Conv2d:
        return torch.nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias,
            self.padding_mode,
            device=device,
            dtype=dtype,
        )

    def tensors(
        self, seed: int, dtype: torch.dtype = torch.float64, device: str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Input, weight and bias drawn from a seeded generator (values bounded, as FFT tests need)."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, self.in_channels, self.height, self.width, generator=gen, dtype=torch.float64)
        w = torch.randn(self.out_channels, self.in_per_group, *self.kernel, generator=gen, dtype=torch.float64)
        b = torch.randn(self.out_channels, generator=gen, dtype=torch.float64) if self.bias else None
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return move(x), move(w), move(b)


@st.composite
def conv_geometries(
    draw: st.DrawFn,
    max_kernel: int = 7,
    max_stride: int = 3,
    max_dilation: int = 3,
    max_channels: int = 3,
    max_groups: int = 3,
    max_extra_size: int = 6,
    padding_modes: tuple[str, ...] = PADDING_MODES,
) -> ConvGeometry:
    """Draw a valid conv geometry: H != W allowed, even and odd kernels, anisotropic strides,
    dilation, int/tuple/'same'/'valid' padding (sometimes beyond the full padding), all four
    padding modes, bias or not. The input is sized so that the conv has at least one output."""
    kernel = (draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel)))
    dilation = (draw(st.integers(1, max_dilation)), draw(st.integers(1, max_dilation)))
    stride = (draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride)))
    full = (dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid", "beyond"]))
    if kind == "same" and stride != (1, 1):
        kind = "tuple"
    if kind == "int":
        padding: PaddingSpec = draw(st.integers(0, max(full)))
    elif kind == "tuple":
        padding = (draw(st.integers(0, full[0])), draw(st.integers(0, full[1])))
    elif kind == "beyond":
        padding = (full[0] + draw(st.integers(1, 2)), full[1] + draw(st.integers(0, 2)))
    else:
        padding = kind
    padding_mode = draw(st.sampled_from(padding_modes))
    if padding_mode != "zeros" and kind == "valid":
        padding_mode = "zeros"  # nothing to pad
    geometry_padding = padding
    # Size the input: at least one output, and reflect padding needs pad < size.
    probe = ConvGeometry(1, 1, 1, 1, 1, 1, kernel, stride, dilation, padding, padding_mode, False)
    top, bottom, left, right = probe.explicit_padding()
    min_h = max(1, dilation[0] * (kernel[0] - 1) + 1 - top - bottom)
    min_w = max(1, dilation[1] * (kernel[1] - 1) + 1 - left - right)
    if padding_mode == "reflect":
        min_h, min_w = max(min_h, top + 1, bottom + 1), max(min_w, left + 1, right + 1)
    elif padding_mode == "circular":
        min_h, min_w = max(min_h, top, bottom), max(min_w, left, right)
    height = draw(st.integers(min_h, min_h + max_extra_size))
    width = draw(st.integers(min_w, min_w + max_extra_size))
    groups = draw(st.integers(1, max_groups))
    return ConvGeometry(
        batch=draw(st.integers(1, 2)),
        in_per_group=draw(st.integers(1, max_channels)),
        out_per_group=draw(st.integers(1, max_channels)),
        groups=groups,
        height=height,
        width=width,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        padding=geometry_padding,
        padding_mode=padding_mode,
        bias=draw(st.booleans()),
    )


#: Tiny geometries for dense-matrix oracles: the operator matrix stays a few hundred wide.
tiny_geometries = conv_geometries(max_kernel=3, max_stride=2, max_dilation=2, max_channels=2, max_groups=2, max_extra_size=3)

seeds = st.integers(0, 2**31 - 1)
