"""Conv kernels for few-channel inputs on a CPU, where the library's own are slow.

The first conv of an image model sees 1-3 input channels, which the CPU library vectorises poorly:
on the Table 5 MNIST conv (1 -> 32 channels, 5x5, 64 images) its forward takes 2.95 ms against 0.94 ms
for im2col (the k·k shifted views copied into one matrix) and one matmul, and its input gradient
crawls at a few GFLOP/s (docs/methods.md). These are the same sums in another order: results agree
with the library's to fp32 rounding, not bit for bit (tested).

Pure tensor code, used by Neural Cleanse (`attacks/neural_cleanse.py`), whose frozen first conv
needs only the input gradient. The trainer does not use it: its channels-last weights already get
a fast library forward (the measurement is in docs/recipes.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def im2col(x: torch.Tensor, kh: int, kw: int, padding: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """x (B,C,H,W) -> (B·OH·OW, C·kh·kw) patches for a stride-1 conv, with OH, OW."""
    b, c = x.shape[:2]
    ph, pw = padding
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    cols = xp.unfold(2, kh, 1).unfold(3, kw, 1)                 # (B, C, OH, OW, kh, kw), a view
    oh, ow = cols.shape[2:4]
    return cols.permute(0, 2, 3, 1, 4, 5).reshape(b * oh * ow, c * kh * kw), oh, ow


def conv_forward_im2col(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        padding: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A stride-1 conv as im2col + one matmul. Returns the output (channels-last strides) and the
    patch matrix (for a weight gradient)."""
    cout, c, kh, kw = weight.shape
    cols, oh, ow = im2col(x, kh, kw, padding)
    wm = weight.reshape(cout, c * kh * kw).t()
    out = torch.addmm(bias, cols, wm) if bias is not None else cols @ wm
    return out.view(x.shape[0], oh, ow, cout).permute(0, 3, 1, 2), cols


def conv_input_grad(go: torch.Tensor, weight: torch.Tensor, in_shape: torch.Size,
                    padding: tuple[int, int]) -> torch.Tensor:
    """The input gradient of a stride-1 conv: (W^T @ grad_out), then k·k shifted adds (col2im).
    In fp32 (fp64 for fp64 inputs), whatever the dtype of go."""
    b, c, h, wd = in_shape
    ph, pw = padding
    cout, _, kh, kw = weight.shape
    oh, ow = go.shape[2:]
    dt = torch.promote_types(go.dtype, torch.float32)   # bf16 -> fp32; fp32 / fp64 stay
    wm = weight.to(dt).reshape(cout, c * kh * kw)
    g = go.to(dt)                                    # keeps go's memory layout
    if g.is_contiguous():
        gv = g.view(b, cout, oh * ow)
    else:                                            # channels-last: a free view of (b, oh·ow, cout)
        gv = g.permute(0, 2, 3, 1).reshape(b, oh * ow, cout).transpose(1, 2)
    cols = torch.matmul(wm.t(), gv).view(b, c, kh, kw, oh, ow)     # (b, c·kh·kw, oh·ow), contiguous
    out = torch.zeros(b, c, h + 2 * ph, wd + 2 * pw, dtype=dt, device=go.device)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + oh, j:j + ow].add_(cols[:, :, i, j])   # in place: no slice write-back
    return out[:, :, ph:ph + h, pw:pw + wd]


def im2col_ok(m: nn.Module, max_channels: int = 1) -> bool:
    """A plain stride-1 conv with at most `max_channels` input channels and zero padding."""
    return (type(m) is nn.Conv2d and m.in_channels <= max_channels and m.stride == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and isinstance(m.padding, tuple))
