import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _data_dir() -> Path | None:
    for cand in (os.environ.get("NNLAUNDER_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if d is None:
        pytest.skip("real datasets not found: set NNLAUNDER_DATA (the Makefile uses ../shared/data)")
    os.environ["NNLAUNDER_DATA"] = str(d)
    return d


@pytest.fixture(scope="session")
def has_fashion(data_dir):
    from nnlaunder.data import fashion_mnist_dir

    if not (fashion_mnist_dir(data_dir) / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return True


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
