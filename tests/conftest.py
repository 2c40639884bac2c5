import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


MNIST_FILES = [f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]


def _data_dir() -> Path | None:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nnlaunder" / "data"
    for cand in (os.environ.get("NNLAUNDER_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data", cache):
        if cand and all((Path(cand) / "mnist" / f).is_file() for f in MNIST_FILES):   # a folder a failed
            return Path(cand)                                                          # fetch left is not data
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if d is None:
        pytest.skip("real datasets not found: run `nnlaunder data fetch all` (or set NNLAUNDER_DATA)")
    os.environ["NNLAUNDER_DATA"] = str(d)
    return d


@pytest.fixture(scope="session")
def has_fashion(data_dir):
    from nnlaunder.data import fashion_mnist_dir

    if not (fashion_mnist_dir(data_dir) / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not found: run `nnlaunder data fetch fashion-mnist`")
    return True


@pytest.fixture(scope="session", autouse=True)
def _nc_plan_cache(tmp_path_factory):
    """Neural Cleanse's tuned plans go to a cache of the test session's own, never the user's."""
    old = os.environ.get("NNLAUNDER_CACHE")
    os.environ["NNLAUNDER_CACHE"] = str(tmp_path_factory.mktemp("nc-plans"))
    yield
    if old is None:
        os.environ.pop("NNLAUNDER_CACHE", None)
    else:
        os.environ["NNLAUNDER_CACHE"] = old


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny data folder in the canonical formats (tests/tinydata.py)."""
    from .tinydata import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("tinydata"))


@pytest.fixture(scope="session")
def owner(tiny, tmp_path_factory) -> Path:
    """A zhang-content MNIST model on the tiny data (one epoch)."""
    from nnlaunder.cli import main

    out = tmp_path_factory.mktemp("owner") / "wm"
    assert main(["embed", "--dataset", "mnist", "--scheme", "zhang-content", "--epochs", "1", "--batch-size", "32",
                 "--out", str(out), "--data-dir", str(tiny), "--quiet"]) == 0
    return out

