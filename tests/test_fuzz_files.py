"""Property tests on file contents: mutated bytes and well-formed files with hostile values reach
the readers and the verdict, and each ends in a result or one `UserError` line, never another
exception, a hang or a verdict over non-finite outputs (6 × 200 generated cases)."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from nnlaunder.errors import Inconclusive, UserError

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def mutate(seed_bytes: bytes):
    """Strategy: the seed file with bytes flipped, cut, inserted or duplicated."""
    ops = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "dup"]), st.integers(0, 10**6),
                             st.binary(min_size=1, max_size=8)), min_size=1, max_size=4)

    def apply(ops_list):
        b = bytearray(seed_bytes)
        for op, pos, data in ops_list:
            i = pos % (len(b) + 1)
            if op == "flip" and b:
                b[i % len(b)] ^= data[0] or 1
            elif op == "cut":
                del b[i:i + len(data) * 16]
            elif op == "insert":
                b[i:i] = data
            elif op == "dup":
                b[i:i] = b[i:i + 32]
        return bytes(b)
    return ops.map(apply)


def _ends_well(fn, *args):
    try:
        fn(*args)
    except UserError as e:
        assert str(e) and "\n" not in str(e)


def _tmp(data: bytes, name: str) -> Path:
    d = Path(tempfile.mkdtemp())
    p = d / name
    p.write_bytes(data)
    return p


def _idx_seed() -> bytes:
    arr = (np.arange(3 * 4 * 4) % 256).astype(np.uint8)
    return gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 3, 4, 4) + arr.tobytes(), mtime=0)


@FUZZ
@given(mutate(_idx_seed()))
def test_idx_reader(data):
    from nnlaunder.data.readers import read_idx

    _ends_well(read_idx, _tmp(data, "x-idx3-ubyte.gz"))
    if data[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(data)
        except Exception:        # noqa: BLE001 (the reader's own handling is what is tested above)
            return
        _ends_well(read_idx, _tmp(raw, "y-idx3-ubyte"))


def _cifar_seed() -> bytes:
    return pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=4)


@FUZZ
@given(st.one_of(mutate(_cifar_seed()),
                 st.sampled_from([pickle.dumps({b"data": np.full((2, 3072), 300.5), b"labels": [0, 1]}, protocol=4),
                                  pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 99]}),
                                  pickle.dumps({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}),
                                  pickle.dumps([1, 2, 3]), pickle.dumps({b"data": "x", b"labels": "y"})])))
def test_cifar_reader(data):
    from nnlaunder.data.readers import read_cifar_batch

    _ends_well(read_cifar_batch, _tmp(data, "data_batch_1"))


def _npz_seed() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 6, 6), np.uint8), y=np.arange(4))
    return buf.getvalue()


hostile_arrays = st.sampled_from([
    dict(x=np.full((2, 4, 4), np.nan, np.float32), y=np.arange(2)),
    dict(x=np.full((2, 4, 4), np.inf), y=np.arange(2)),
    dict(x=np.zeros((2, 4, 4), np.complex64), y=np.arange(2)),
    dict(x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 2**62])),
    dict(x=np.zeros((2, 4, 4), np.uint8), y=np.array([-1, 0])),
    dict(x=np.zeros((2, 4, 4), np.uint8), y=np.array([0.5, 1.0])),
    dict(x=np.zeros((0, 4, 4), np.uint8), y=np.zeros(0, np.int64)),
    dict(x=np.zeros((2, 4, 4, 7), np.uint8), y=np.arange(2)),
    dict(x=np.zeros(5, np.uint8), y=np.arange(5)),
    dict(x=np.zeros((2, 4, 4), ">f4"), y=np.arange(2).astype(">i8")),      # big-endian: read as native
    dict(x=np.zeros((2, 4, 4), np.longdouble), y=np.arange(2)),             # float128: refused
    dict(x=np.array(["a", "b"]), y=np.arange(2)),
    dict(x=np.zeros((2, 4, 4), np.float16), y=np.arange(2, dtype=np.uint64)),
    dict(x=np.zeros((2, 4, 4), bool), y=np.arange(2)),
])


def _npy_as_npz() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 4, 4), np.uint8))
    return buf.getvalue()


def _huge_header() -> bytes:
    import zipfile

    out, hdr = io.BytesIO(), io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "<f4", "fortran_order": False, "shape": (784 * 10**9,)})
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("x.npy", hdr.getvalue())
        z.writestr("y.npy", hdr.getvalue())
    return out.getvalue()


@FUZZ
@given(st.one_of(mutate(_npz_seed()), hostile_arrays.map(lambda d: (lambda b: (np.savez(b, **d), b.getvalue())[1])(
    io.BytesIO())), st.sampled_from([_npy_as_npz(), _huge_header()]), mutate(_huge_header())))
def test_npz_reader(data):
    from nnlaunder.external.data import read_npz

    _ends_well(read_npz, _tmp(data, "d.npz"))


def _toml_seed() -> bytes:
    return (b'name = "f"\ndataset = "mnist"\nscheme = "zhang-noise"\nbudget = 0.006\nthreshold = 5.0\n'
            b'[attack_params]\ndt = 0.5\nnc = {max_epochs = 3}\n[sweep]\nseed = [0, 1]\n')


@FUZZ
@given(st.one_of(mutate(_toml_seed()), st.text(max_size=200).map(str.encode)))
def test_experiment_reader(data):
    from nnlaunder.experiments.config import load_experiment

    _ends_well(load_experiment, _tmp(data, "e.toml"))


@pytest.fixture(scope="module")
def small_model():
    from nnlaunder.models import build

    return build("mnist-cnn", seed=0)


@FUZZ
@given(st.one_of(
    mutate(json.dumps({"arch": "mnist-cnn", "num_classes": 10, "dataset": "mnist", "scheme": "zhang-noise"}).encode()),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                 lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(
                     st.sampled_from(["arch", "num_classes", "scheme", "scheme_params", "dataset"]), c, max_size=5)),
                 max_leaves=8).map(lambda v: json.dumps(v).encode())))
def test_model_metadata_and_weights(small_model, data):
    from nnlaunder.checkpoint import load_model

    d = Path(tempfile.mkdtemp())
    (d / "m.json").write_bytes(data)
    (d / "m.safetensors").write_bytes(save(small_model.state_dict()))
    _ends_well(load_model, d / "m")


def _weights_seed(model) -> bytes:
    return save(model.state_dict())


@FUZZ
@given(st.data())
def test_hostile_weights_never_give_a_verdict_over_nan(small_model, data):
    """Mutated safetensors bytes, or well-formed weights with NaN / Inf / huge / zero values: a
    one-line refusal, an inconclusive verdict, or a verdict over finite outputs only."""
    from nnlaunder.checkpoint import load_into, load_state
    from nnlaunder.models import build
    from nnlaunder.watermarks.schemes import Watermark
    from nnlaunder.watermarks.verify import verify

    state = {k: v.clone() for k, v in small_model.state_dict().items()}
    if data.draw(st.booleans()):
        blob = data.draw(mutate(_weights_seed(small_model)))
    else:
        k = data.draw(st.sampled_from(sorted(state)))
        value = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e38, 0.0, -1e30, 1e-45]))
        idx = data.draw(st.sampled_from(["all", "one"]))
        if idx == "all":
            state[k].fill_(value)
        else:
            state[k].view(-1)[0] = value
        blob = save(state)
    p = _tmp(blob, "w.safetensors")
    model = build("mnist-cnn")
    try:
        load_into(model, load_state(p), str(p))
    except UserError as e:
        assert "\n" not in str(e)
        return
    g = torch.Generator().manual_seed(0)
    wm = Watermark("t", torch.rand(4, 1, 28, 28, generator=g), torch.zeros(4, dtype=torch.long),
                   torch.rand(20, 1, 28, 28, generator=g), torch.zeros(20, dtype=torch.long), 0, {})
    try:
        v = verify(model.eval(), wm, threshold=0.0)
    except Inconclusive:
        return
    with torch.no_grad():
        assert torch.isfinite(model(wm.verify_x)).all()       # a verdict only over real predictions
    assert 0 <= v.wm_acc <= 100
