"""Conv kernels for few-channel inputs on a CPU, where the library's own are slow.

The first conv of an image model sees 1-3 input channels, which the CPU library vectorises poorly:
on the Table 5 MNIST conv (1 -> 32 channels, 5x5, 64 images) its forward takes 2.95 ms against 0.94 ms
for im2col (the k·k shifted views copied into one matrix) and one matmul, and its input gradient
crawls at a few GFLOP/s (docs/methods.md). These are the same sums in another order: results agree
with the library's to fp32 rounding, not bit for bit (tested).

Pure tensor code, used by Neural Cleanse (`attacks/neural_cleanse.py`), whose frozen first conv
needs only the input gradient: `with_input_grad_convs` wraps such convs (`InputGradConv`) so that their
backward is one matmul and the shifted adds. The trainer does not use it: its channels-last weights already get
a fast library forward (the measurement is in docs/recipes.md).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import native


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
    """A stride-1 conv as im2col + one matmul, without autograd. Returns the output (channels-last, a
    tensor of its own rather than a view, so an in-place ReLU after it may write into it) and the patch
    matrix (for a weight gradient)."""
    cout, c, kh, kw = weight.shape
    cols, oh, ow = im2col(x, kh, kw, padding)
    wm = weight.reshape(cout, c * kh * kw).t()
    out = torch.empty((x.shape[0], cout, oh, ow), dtype=cols.dtype, device=x.device, memory_format=torch.channels_last)
    flat = out.permute(0, 2, 3, 1).view(-1, cout)
    torch.addmm(bias, cols, wm, out=flat) if bias is not None else torch.mm(cols, wm, out=flat)
    return out, cols


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


# --- conv -> 2x2 max-pool -> ReLU fused (the native kernel, csrc/conv_pool.c) -------------------------

NATIVE_MAX_PATCH = 128          # cin·(k+1)² the kernel's input gradient holds in registers


def conv_pool_ok(conv: nn.Module, pool: nn.Module) -> bool:
    """A conv the fused kernel takes (stride 1, zero padding, at most 3 input channels, a multiple of
    16 output channels), followed by a 2x2 stride-2 floor max-pool without indices."""
    if not (im2col_ok(conv, 3) and conv.out_channels % 16 == 0 and conv.kernel_size[0] == conv.kernel_size[1]
            and conv.in_channels * (conv.kernel_size[0] + 1) ** 2 <= NATIVE_MAX_PATCH):
        return False
    if type(pool) is not nn.MaxPool2d or pool.return_indices or pool.ceil_mode:
        return False
    return (_pair(pool.kernel_size) == (2, 2) and _pair(pool.stride) == (2, 2) and _pair(pool.padding) == (0, 0)
            and _pair(pool.dilation) == (1, 1))


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, tuple | list) else (v, v)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous) in 64-byte aligned memory, as the native kernel reads its vectors (the library's CPU
    allocator aligns to 64 bytes already; a copy only where it did not)."""
    if t.data_ptr() % 64 == 0:
        return t
    buf = torch.empty(t.numel() + 16, dtype=t.dtype)
    off = (-buf.data_ptr() % 64) // t.element_size()
    out = buf[off:off + t.numel()].view(t.shape)
    out.copy_(t)
    return out


class _ConvPoolFn(torch.autograd.Function):
    """relu?(maxpool2x2(conv(x))) by the native kernel; the input gradient only (frozen weights)."""

    @staticmethod
    def forward(ctx, x, mod, lib):
        ph, pw = mod.padding
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        xp = xp.contiguous()
        n, cin, hp, wp = xp.shape
        k, cout = mod.k, mod.cout
        oh, ow = (hp - k + 1) // 2, (wp - k + 1) // 2
        wt, w6 = mod.packed()
        y = _aligned(torch.empty(n, oh, ow, cout, dtype=torch.float32))
        arg = torch.empty(n, oh, ow, cout, dtype=torch.uint8)
        bias = mod.bias.detach().contiguous() if mod.bias is not None else None
        rc = lib.nnl_conv_pool_fwd(xp.data_ptr(), wt.data_ptr(), bias.data_ptr() if bias is not None else None,
                                   y.data_ptr(), arg.data_ptr(), n, cin, hp, wp, k, cout, int(mod.relu),
                                   torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"native conv-pool kernel refused shape {tuple(xp.shape)}")
        ctx.save_for_backward(y, arg, w6)
        ctx.shape, ctx.pad, ctx.mod_relu, ctx.k, ctx.lib = xp.shape, mod.padding, mod.relu, k, lib
        return y.permute(0, 3, 1, 2)            # (N, cout, OH, OW) with channels-last strides

    @staticmethod
    def backward(ctx, go):
        y, arg, w6 = ctx.saved_tensors
        n, cin, hp, wp = ctx.shape
        g = go.float().permute(0, 2, 3, 1).contiguous()     # free when go is channels-last already
        gin = torch.empty(n, cin, hp, wp, dtype=torch.float32)
        rc = ctx.lib.nnl_conv_pool_bwd(g.data_ptr(), y.data_ptr(), arg.data_ptr(), w6.data_ptr(), gin.data_ptr(),
                                       n, cin, hp, wp, ctx.k, y.shape[-1], int(ctx.mod_relu),
                                       torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"native conv-pool kernel refused shape {tuple(ctx.shape)}")
        ph, pw = ctx.pad
        return gin[:, :, ph:hp - ph, pw:wp - pw], None, None


class FusedConvPool(nn.Module):
    """conv -> 2x2 max-pool (-> ReLU) as one module: by the native kernel for fp32 CPU inputs (forward
    and input gradient; the weights must be frozen), by the library's ops otherwise. Shares the conv's
    parameters. The same function; the input gradient's sums run in another order (rounding), ties in a
    pool window go to the first maximum as in the library's max-pool."""

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.padding = tuple(conv.padding)
        self.k, self.cout, self.relu = conv.kernel_size[0], conv.out_channels, relu
        self._packed: tuple | None = None

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights as the kernel reads them (re-packed when they change): (k, k, cin, cout) for the
        forward; for the gradient, each kernel placed at the four window positions of a (cin, k+1, k+1)
        patch, padded to a multiple of 16 floats."""
        w = self.weight.detach()
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._packed[0] != key:
            k, cout, cin = self.k, self.cout, w.shape[1]
            wt = w.float().permute(2, 3, 1, 0).contiguous()
            w6 = torch.zeros(4, cout, cin, k + 1, k + 1)
            for d in range(4):
                w6[d, :, :, d // 2:d // 2 + k, d % 2:d % 2 + k] = w.float()
            w6 = w6.reshape(4, cout, -1)
            w6 = F.pad(w6, (0, (-w6.shape[-1]) % 16)).contiguous()
            self._packed = (key, _aligned(wt), _aligned(w6))
        return self._packed[1], self._packed[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = native.conv_pool()
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if (lib is not None and frozen and x.device.type == "cpu" and x.dtype == torch.float32
                and x.ndim == 4 and x.shape[1] == self.weight.shape[1] and x.shape[2] + 2 * self.padding[0] > self.k
                and x.shape[3] + 2 * self.padding[1] > self.k):
            return _ConvPoolFn.apply(x, self, lib)
        y = F.max_pool2d(F.conv2d(x, self.weight, self.bias, padding=self.padding), 2)
        return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return f"k={self.k}, cout={self.cout}, padding={self.padding}, relu={self.relu}"


class _InputGradConv2d(torch.autograd.Function):
    """conv2d whose backward gives the input gradient only, as (W^T @ grad_out) followed by k·k
    shifted adds (col2im, `kernels.conv_input_grad`), in fp32. For a frozen conv with 1-3 input
    channels (the first layer, whose input is the stamped image) this is several times faster on a
    CPU than the library's backward, which runs such convs at a few GFLOP/s (docs/methods.md). The
    same sums in another order: results agree with the native gradient to rounding, not bit for bit.
    Computed in fp32 (fp64 for fp64 inputs), also under bf16 autocast. On a CPU without autocast a
    one-channel input's forward is im2col + matmul as well (`im2col_forward`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, im2col_forward=True):
        ctx.save_for_backward(weight)
        ctx.in_shape, ctx.padding, ctx.in_dtype = x.shape, padding, x.dtype
        if (not im2col_forward or x.shape[1] != 1 or x.device.type != "cpu"
                or torch.is_autocast_enabled(x.device.type)):
            return F.conv2d(x, weight, bias, padding=padding)
        # With 3 channels the library's forward is the faster one (docs/methods.md).
        return conv_forward_im2col(x, weight, bias, padding)[0]

    @staticmethod
    def backward(ctx, go):
        (w,) = ctx.saved_tensors
        return conv_input_grad(go, w, ctx.in_shape, ctx.padding).to(ctx.in_dtype), None, None, None, None


class InputGradConv(nn.Module):
    """Wraps a frozen nn.Conv2d (stride 1, no dilation, one group, zero padding) so that its input
    gradient runs through `_InputGradConv2d`. Shares the conv's parameters."""

    def __init__(self, conv: nn.Conv2d, im2col_forward: bool = True):
        super().__init__()
        self.conv = conv
        self.im2col_forward = im2col_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if c.weight.requires_grad or (c.bias is not None and c.bias.requires_grad) or not x.requires_grad:
            return c(x)
        return _InputGradConv2d.apply(x, c.weight, c.bias, c.padding, self.im2col_forward)


def with_input_grad_convs(model: nn.Module, max_channels: int = 3, im2col_forward: bool = True) -> nn.Module:
    """A copy of `model` whose convs with at most `max_channels` input channels compute their input
    gradient as a matmul (`InputGradConv`); the original model is not touched."""
    fast = copy.deepcopy(model)
    for parent in list(fast.modules()):
        for name, child in list(parent.named_children()):
            if im2col_ok(child, max_channels):
                setattr(parent, name, InputGradConv(child, im2col_forward))
    return fast
