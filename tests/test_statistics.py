import numpy as np
import pytest
from scipy import stats

from toolkit.decompose.statistics import regimes, spearman_with_ci


def test_spearman_matches_scipy_and_interval_covers():
    rng = np.random.default_rng(3)
    x = rng.normal(size=300)
    y = x + rng.normal(size=300)
    r = spearman_with_ci(x, y, n_boot=500)
    assert r.rho == pytest.approx(stats.spearmanr(x, y).statistic)
    assert r.ci_low < r.rho < r.ci_high and r.ci_high - r.ci_low < 0.3
    assert r.p_value < 1e-10 and r.n == 300


def test_spearman_independent_data_has_interval_around_zero():
    rng = np.random.default_rng(4)
    r = spearman_with_ci(rng.normal(size=400), rng.normal(size=400), n_boot=500)
    assert r.ci_low < 0 < r.ci_high and r.p_value > 0.01


def test_spearman_bad_input():
    with pytest.raises(ValueError, match="at least 3 anchors"):
        spearman_with_ci([1, 2], [1, 2])
    with pytest.raises(ValueError, match="same length"):
        spearman_with_ci([1, 2, 3], [1, 2])


def test_regimes_split_into_tertiles():
    rng = np.random.default_rng(5)
    err = rng.random(90)
    rows = regimes(err, err ** 2)
    assert [r["regime"] for r in rows] == ["low", "mid", "high"]
    assert sum(r["n"] for r in rows) == 90
    assert rows[0]["rel_err"] < rows[1]["rel_err"] < rows[2]["rel_err"]
    assert all(r["rho"] == pytest.approx(1.0) for r in rows)


def test_mean_rho_interval_covers_the_mean_and_shrinks_with_data():
    from toolkit.decompose.statistics import mean_rho_with_ci
    rng = np.random.default_rng(6)

    def layers(n):
        return [(x, x + s * rng.normal(size=n)) for s in (0.5, 1.0, 2.0) for x in [rng.normal(size=n)]]
    small, large = mean_rho_with_ci(layers(60), n_boot=400), mean_rho_with_ci(layers(2000), n_boot=400)
    for r in (small, large):
        assert r["ci_low"] < r["rho_mean"] < r["ci_high"] and r["n_layers"] == 3
    assert large["ci_high"] - large["ci_low"] < 0.5 * (small["ci_high"] - small["ci_low"])
    g = layers(100)
    assert mean_rho_with_ci(g)["rho_mean"] == pytest.approx(np.mean([stats.spearmanr(x, y).statistic for x, y in g]))
    with pytest.raises(ValueError, match="at least one layer"):
        mean_rho_with_ci([])


@pytest.mark.parametrize("n_distinct", [3, 40, 10_000])
def test_resampled_ranks_equal_scipy_rankdata_with_and_without_ties(n_distinct):
    from scipy import stats as sstats

    from toolkit.decompose.statistics import resampled_ranks
    rng = np.random.default_rng(n_distinct)
    x = rng.integers(0, n_distinct, size=300).astype(float) * 0.37      # few distinct values: many ties
    idx = rng.integers(0, x.size, size=(50, x.size))
    np.testing.assert_array_equal(resampled_ranks(x, idx), sstats.rankdata(x[idx], axis=-1))
    x[5] = np.nan                                                          # non-finite: scipy's own answer
    np.testing.assert_array_equal(resampled_ranks(x, idx), sstats.rankdata(x[idx], axis=-1))
    with pytest.raises(ValueError, match=r"\[B, m\]"):
        resampled_ranks(x, idx[0])
