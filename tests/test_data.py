import gzip
import pickle

import numpy as np
import pytest
import torch

from nnlaunder import data as D
from nnlaunder.data.readers import read_cifar_batch, read_idx
from nnlaunder.errors import UserError


def test_mnist_reader_real_files(data_dir):
    tr = D.load("mnist", data_dir, "train")
    te = D.load("mnist", data_dir, "test")
    assert tr.x.shape == (60000, 1, 28, 28) and te.x.shape == (10000, 1, 28, 28)
    assert tr.x.dtype == torch.float32 and 0.0 <= float(tr.x.min()) and float(tr.x.max()) == 1.0
    # The canonical first labels of MNIST train / test.
    assert tr.y[:5].tolist() == [5, 0, 4, 1, 9]
    assert te.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(tr.y).tolist()[0] == 5923


def test_cifar_reader_real_files(data_dir):
    x, y = read_cifar_batch(data_dir / "cifar10" / "cifar-10-batches-py" / "test_batch")
    assert x.shape == (10000, 3, 32, 32) and x.dtype == np.uint8
    assert y[:5].tolist() == [3, 8, 8, 0, 6]
    assert np.bincount(y).tolist() == [1000] * 10
    # train[0] of data_batch_1 starts 59, 43, 50 (red channel, first row) per PROVENANCE.md
    x1, _ = read_cifar_batch(data_dir / "cifar10" / "cifar-10-batches-py" / "data_batch_1")
    assert x1[0, 0, 0, :3].tolist() == [59, 43, 50]


def test_fashion_reader(data_dir, has_fashion):
    te = D.load("fashion-mnist", data_dir, "test")
    assert te.x.shape == (10000, 1, 28, 28) and te.num_classes == 10
    assert te.y[:3].tolist() == [9, 2, 1]


def test_adi_trigger_set(data_dir):
    ts = D.load_adi_trigger_set(data_dir, size=32)
    assert ts.x.shape == (100, 3, 32, 32)
    assert 0 <= float(ts.x.min()) and float(ts.x.max()) <= 1
    first = [int(float(s)) for s in (data_dir / "adi-trigger-set" / "labels-cifar.txt").read_text().split()[:3]]
    assert ts.y[:3].tolist() == first


def test_missing_file_names_it(tmp_path):
    (tmp_path / "mnist").mkdir()
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz.*mnist"):
        D.load("mnist", tmp_path, "train")
    with pytest.raises(UserError, match="data_batch_1.*cifar.html"):
        D.load("cifar10", tmp_path, "train")


def test_corrupt_idx_is_caught(tmp_path, data_dir):
    raw = gzip.decompress((data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    bad = tmp_path / "labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_idx(bad)
    junk = tmp_path / "junk.gz"
    junk.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(UserError, match="corrupt gzip"):
        read_idx(junk)


def test_cifar_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        read_cifar_batch(p)


def test_no_data_dir_falls_back_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("NNLAUNDER_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert D.resolve_data_dir(None) == tmp_path / "nnlaunder" / "data"
    with pytest.raises(UserError, match="nnlaunder data fetch mnist"):
        D.load("mnist", None, "train")


def test_stratified_fraction_and_per_class(data_dir):
    tr = D.load("mnist", data_dir, "train")
    idx = D.stratified_indices(tr.y, fraction=0.006, seed=3)
    assert len(idx) == 360 and len(set(idx.tolist())) == 360
    counts = torch.bincount(tr.y[idx], minlength=10)
    expected = torch.bincount(tr.y, minlength=10).double() * 0.006
    assert (counts.double() - expected).abs().max() <= 1
    assert torch.equal(idx, D.stratified_indices(tr.y, fraction=0.006, seed=3))
    assert not torch.equal(idx, D.stratified_indices(tr.y, fraction=0.006, seed=4))
    one = D.stratified_subset(tr, per_class=1, seed=0)
    assert sorted(one.y.tolist()) == list(range(10))


def test_stratified_errors():
    y = torch.tensor([0, 0, 1, 1])
    with pytest.raises(UserError):
        D.stratified_indices(y, fraction=0.0)
    with pytest.raises(UserError):
        D.stratified_indices(y, per_class=3)
    with pytest.raises(UserError):
        D.stratified_indices(y)


def test_an_empty_fashion_folder_left_by_a_failed_fetch_is_not_the_dataset(tmp_path):
    from nnlaunder.data import FASHION_MNIST_SYSTEM_DIR, fashion_mnist_dir

    (tmp_path / "fashion-mnist").mkdir()
    assert fashion_mnist_dir(tmp_path) == FASHION_MNIST_SYSTEM_DIR
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    assert fashion_mnist_dir(tmp_path) == tmp_path / "fashion-mnist"


def test_one_budget_type_one_spelling():
    from nnlaunder.data import Budget
    from nnlaunder.errors import UserError

    assert Budget.parse(0.006).kwargs() == {"fraction": 0.006}
    assert Budget.parse("0.006") == Budget(fraction=0.006)
    assert Budget.parse("5/class").kwargs() == {"per_class": 5} and str(Budget.parse(" 5 / class ")) == "5/class"
    for bad in (0, 1.5, "nan", float("inf"), "x", "0/class", True, -0.1):
        with pytest.raises(UserError):
            Budget.parse(bad)
    with pytest.raises(UserError):
        Budget.parse("6000/class", "mnist")          # MNIST's smallest class holds 5421
    with pytest.raises(UserError):
        Budget(fraction=0.1, per_class=3)
