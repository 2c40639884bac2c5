"""The native conv -> max-pool -> ReLU kernel: the library's function and gradients, to rounding; ties,
NaN and padding as the library has them; a clean fallback where it cannot be built."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnlaunder.speed import native
from nnlaunder.speed.kernels import FusedConvPool, conv_pool_ok
from nnlaunder.speed.rewrite import conv_pool_runs, fuse_conv_pool


@pytest.fixture
def lib():
    native.reset()
    got = native.conv_pool()
    if got is None:
        pytest.skip(f"native kernel unavailable here: {native.status()}")
    return got


def _reference(x, conv, relu):
    y = F.max_pool2d(F.conv2d(x, conv.weight, conv.bias, padding=conv.padding), 2)
    return F.relu(y) if relu else y


@pytest.mark.parametrize("cin,k,pad,cout,size,bias,relu", [
    (1, 5, 0, 32, 28, True, True),       # the MNIST first layer
    (3, 3, 1, 16, 32, True, True),       # a CIFAR-sized first layer
    (3, 5, 2, 48, 15, False, True),      # odd size: the pool floors
    (2, 3, 0, 64, 9, True, False),       # no ReLU
    (1, 1, 0, 16, 4, True, True),
])
def test_fused_matches_the_library_forward_and_input_gradient(lib, cin, k, pad, cout, size, bias, relu):
    torch.manual_seed(cin * 100 + k)
    conv = nn.Conv2d(cin, cout, k, padding=pad, bias=bias).requires_grad_(False)
    fused = FusedConvPool(conv, relu)
    x = torch.rand(7, cin, size, size, requires_grad=True)
    ref = _reference(x, conv, relu)
    out = fused(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, g)
    (g_out,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


def test_ties_go_to_the_first_maximum_and_nan_propagates_as_in_the_library(lib):
    conv = nn.Conv2d(1, 16, 1, bias=False).requires_grad_(False)
    conv.weight.fill_(1.0)
    x = torch.ones(2, 1, 4, 4)                 # every window a four-way tie
    x[1, 0, 1, 1] = float("nan")
    x.requires_grad_(True)
    ref, out = _reference(x, conv, True), FusedConvPool(conv, True)(x)
    assert torch.equal(ref.isnan(), out.isnan())
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num())
    g = torch.ones_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, g)
    (g_out,) = torch.autograd.grad(out, x, g)
    assert torch.equal(g_out[0], g_ref[0])     # the tie's gradient lands where the library's does


def test_a_channels_last_gradient_and_weights_are_taken_as_they_come(lib):
    torch.manual_seed(1)
    conv = nn.Conv2d(1, 32, 5).requires_grad_(False).to(memory_format=torch.channels_last)
    fused = FusedConvPool(conv, True)
    x = torch.rand(5, 1, 28, 28, requires_grad=True)
    out = fused(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    nxt = nn.Conv2d(32, 16, 5).requires_grad_(False).to(memory_format=torch.channels_last)
    ref = nxt(_reference(x, conv, True)).sum()
    (g_ref,) = torch.autograd.grad(ref, x)
    (g_out,) = torch.autograd.grad(nxt(out).sum(), x)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


def test_inputs_the_kernel_cannot_take_get_the_library_s_answer(lib):
    conv = nn.Conv2d(1, 16, 5).requires_grad_(False)
    fused = FusedConvPool(conv, True)
    with pytest.raises(RuntimeError):             # 3 channels into a 1-channel conv: the library's error
        fused(torch.rand(2, 3, 28, 28))
    with pytest.raises(RuntimeError, match="too small"):       # too small to pool: the library's error
        fused(torch.rand(2, 1, 5, 5))


def test_changed_weights_are_repacked(lib):
    conv = nn.Conv2d(1, 16, 3).requires_grad_(False)
    fused = FusedConvPool(conv, False)
    x = torch.rand(3, 1, 8, 8)
    fused(x)
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    torch.testing.assert_close(fused(x), _reference(x, conv, False), rtol=1e-5, atol=1e-5)


def test_trainable_weights_fp64_and_no_kernel_take_the_library_path(lib, monkeypatch):
    conv = nn.Conv2d(1, 16, 3)
    fused = FusedConvPool(conv, True)
    x = torch.rand(2, 1, 8, 8)
    (fused(x).sum()).backward()                # weight gradients need the library's path
    assert conv.weight.grad is not None
    conv.requires_grad_(False)
    xd = x.double()
    torch.testing.assert_close(FusedConvPool(conv.double(), True)(xd), _reference(xd, conv, True))
    monkeypatch.setenv("NNLAUNDER_NATIVE", "off")
    native.reset()
    assert native.conv_pool() is None and "NNLAUNDER_NATIVE" in native.status()
    torch.testing.assert_close(FusedConvPool(conv.float(), True)(x), _reference(x, conv.float(), True))
    native.reset()


def test_a_missing_or_failing_compiler_is_a_reason_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NNLAUNDER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    native.reset()
    assert native.conv_pool() is None and "no C compiler" in native.status()
    monkeypatch.setenv("CC", "false")
    native.reset()
    assert native.conv_pool() is None and "failed" in native.status()
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2))
    assert fuse_conv_pool(model) is model      # nothing to fuse with: the model as it is
    native.reset()


def test_the_build_is_cached_per_source_compiler_and_cpu(lib, monkeypatch, tmp_path):
    monkeypatch.setenv("NNLAUNDER_CACHE", str(tmp_path))
    native.reset()
    assert native.conv_pool() is not None
    built = list((tmp_path / "native").glob("conv_pool-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native.reset()
    assert native.conv_pool() is not None
    assert built[0].stat().st_mtime_ns == stamp          # loaded, not rebuilt
    native.reset()


def test_fuse_conv_pool_rewrites_matching_runs_only(lib):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),          # conv, ReLU, pool: fused
        nn.Conv2d(32, 16, 3), nn.MaxPool2d(2), nn.ReLU(),         # 32 input channels: left alone
        nn.Flatten(), nn.Linear(16 * 25, 10)).eval().requires_grad_(False)
    other = nn.Sequential(nn.Conv2d(3, 10, 3), nn.MaxPool2d(2))   # 10 output channels: left alone
    assert conv_pool_runs(model) == 1 and conv_pool_runs(other) == 0
    assert fuse_conv_pool(other) is other
    fused = fuse_conv_pool(model)
    assert isinstance(fused[0], FusedConvPool) and isinstance(fused[1], nn.Identity)
    assert type(fused[3]) is nn.Conv2d and type(model[0]) is nn.Conv2d     # the original is untouched
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    (g_ref,) = torch.autograd.grad(model(x).sum(), x)
    (g_out,) = torch.autograd.grad(fused(x).sum(), x)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-6)


def test_pools_the_kernel_does_not_take():
    conv = nn.Conv2d(1, 16, 3)
    assert conv_pool_ok(conv, nn.MaxPool2d(2))
    assert not conv_pool_ok(conv, nn.MaxPool2d(3))
    assert not conv_pool_ok(conv, nn.MaxPool2d(2, ceil_mode=True))
    assert not conv_pool_ok(conv, nn.MaxPool2d(2, padding=1))
    assert not conv_pool_ok(conv, nn.MaxPool2d(2, stride=1))
    assert not conv_pool_ok(conv, nn.AvgPool2d(2))
    assert not conv_pool_ok(nn.Conv2d(1, 16, 3, stride=2), nn.MaxPool2d(2))
    assert not conv_pool_ok(nn.Conv2d(3, 16, 7), nn.MaxPool2d(2))              # 3·8² floats: over the patch


def test_neural_cleanse_with_the_kernel_recovers_the_same_triggers(lib):
    from nnlaunder.attacks.neural_cleanse import NCConfig, neural_cleanse
    from nnlaunder.models import build

    from .synthetic import make_images

    model = build("mnist-cnn", 10, seed=0).eval()
    x = torch.nn.functional.interpolate(make_images(48, seed=2).x.mean(1, keepdim=True), size=(28, 28))
    cfg = NCConfig(max_epochs=3, batch_size=16, seed=1)
    runs = {f: neural_cleanse(model, x, NCConfig(**{**cfg.__dict__, "fused_conv_pool": f}), num_classes=10)
            for f in (True, False)}
    assert runs[True].plan["fused_conv_pool"] and not runs[False].plan["fused_conv_pool"]
    torch.testing.assert_close(runs[True].masks, runs[False].masks, rtol=0, atol=1e-4)
    torch.testing.assert_close(runs[True].l1, runs[False].l1, rtol=1e-4, atol=1e-3)


def test_the_result_does_not_depend_on_the_thread_count_or_the_batch(lib):
    torch.manual_seed(3)
    conv = nn.Conv2d(1, 32, 5).requires_grad_(False)
    fused = FusedConvPool(conv, True)
    x = torch.rand(9, 1, 28, 28)
    g = torch.randn(9, 32, 12, 12)
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        xi = x.clone().requires_grad_(True)
        out = fused(xi)
        outs.append((out.detach(), torch.autograd.grad(out, xi, g)[0]))
    torch.set_num_threads(2)
    assert all(torch.equal(a, outs[0][0]) and torch.equal(b, outs[0][1]) for a, b in outs)
    xi = x[4:5].clone().requires_grad_(True)                    # one image alone: bit for bit the same
    out = fused(xi)
    assert torch.equal(out.detach(), outs[0][0][4:5])
    assert torch.equal(torch.autograd.grad(out, xi, g[4:5])[0], outs[0][1][4:5])


def test_misaligned_packed_tensors_are_copied_to_aligned_memory():
    from nnlaunder.speed.kernels import _aligned

    base = torch.arange(40, dtype=torch.float32)
    t = base[1:33].view(4, 8)                      # 4 bytes past a 64-byte boundary
    assert t.data_ptr() % 64 != 0
    a = _aligned(t)
    assert a.data_ptr() % 64 == 0 and torch.equal(a, t) and a.shape == t.shape
    assert _aligned(a) is a



@pytest.mark.parametrize("march,width", [("x86-64", 4), ("x86-64-v3", 8)])
def test_builds_for_older_vector_units_compute_the_same(lib, tmp_path, monkeypatch, march, width):
    """The kernel's SSE (4 floats) and AVX2 (8 floats) builds, which a machine with AVX-512 never makes by
    itself: the same results as the library's ops."""
    import platform
    import shutil
    import subprocess

    cc = shutil.which("cc")
    if platform.machine() != "x86_64" or cc is None:
        pytest.skip("needs an x86-64 C compiler")
    flags = [f if not f.startswith("-march=") else f"-march={march}" for f in native.FLAGS]
    src = tmp_path / "conv_pool.c"
    src.write_bytes(native._source())
    so = tmp_path / f"conv_pool-{march}.so"
    subprocess.run([cc, *flags, str(src), "-o", str(so)], check=True, capture_output=True)
    built = native.bind(so)
    assert built.nnl_conv_pool_vector_width() == width
    monkeypatch.setitem(native._state, "lib", built)
    for cin, k, pad, cout, size in [(1, 5, 0, 32, 28), (3, 3, 1, 48, 15)]:
        torch.manual_seed(cout)
        conv = nn.Conv2d(cin, cout, k, padding=pad).requires_grad_(False)
        x = torch.rand(5, cin, size, size, requires_grad=True)
        ref, out = _reference(x, conv, True), FusedConvPool(conv, True)(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                                   rtol=1e-4, atol=1e-5)
