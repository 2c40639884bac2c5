import math

import pytest

from nnlaunder.errors import UserError
from nnlaunder.watermarks.verify import binomial_sf, vanilla_threshold, verdict


def brute_sf(k, n, p):
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.3), (3, 10, 0.3), (10, 10, 0.3), (7, 20, 0.015), (1, 5, 0.5)])
def test_binomial_tail_matches_brute_force(k, n, p):
    assert binomial_sf(k, n, p) == pytest.approx(brute_sf(k, n, p), rel=1e-9, abs=1e-300)


def test_binomial_tail_large_n_is_stable():
    # 9000 triggers, 2% hits at a 1.5% null rate: small but positive, no overflow
    p = binomial_sf(180, 9000, 0.015)
    assert 0 < p < 1e-3
    # at the mean (135 of 9000) the tail is about one half
    assert binomial_sf(135, 9000, 0.015) == pytest.approx(0.5, abs=0.05)


def test_vanilla_threshold_is_max_over_epochs_and_seeds():
    assert vanilla_threshold([0.5, 1.5, 0.7]) == 1.5
    assert vanilla_threshold([[0.5, 0.2], [3.0, 0.1]]) == 3.0
    with pytest.raises(UserError):
        vanilla_threshold([])
    with pytest.raises(UserError):
        vanilla_threshold([120.0])


def test_verdict():
    v = verdict(9000, 9000, threshold=1.5)
    assert v.owned and v.wm_acc == 100.0 and v.p_value < 1e-100
    # laundered: below the threshold -> no proof, whatever the p-value says
    v = verdict(1, 9000, threshold=1.5)
    assert not v.owned and v.p_value == pytest.approx(1.0)
    # just above the threshold but not significant
    v = verdict(16, 1000, threshold=1.5)
    assert v.wm_acc > 1.5 and not v.owned and v.p_value > 0.01
    # a zero threshold does not make a single hit a proof
    assert not verdict(1, 1000, threshold=0.0).owned
    with pytest.raises(UserError):
        verdict(5, 4, threshold=1.0)
