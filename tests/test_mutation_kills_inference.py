"""engine/inference.py against closed forms (issue 16: tests that kill the surviving mutants).

Every profile here is a function whose cut-off crossing is known analytically (a quadratic on the
natural or the log scale, a linear ramp, a step), and the search schedule is checked against the one
:func:`profile_limit` documents (``xhat +- step * growth**k``, ``xhat * exp(+-step * growth**k)``,
``scale * growth**k`` from an estimate at 0, a geometric approach to an edge where the criterion is
undefined). Intervals are checked against the normal / chi-square quantiles and numpy's quantile;
the bootstrap against the documented seed rule and failure accounting.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from therapist_effects.engine.inference import (
    DEFAULT_LEVEL,
    ProfileLimit,
    bootstrap_rng,
    chi2_cut,
    parametric_bootstrap,
    percentile_interval,
    profile_end,
    profile_interval,
    profile_limit,
    wald_interval,
)
from therapist_effects.exceptions import ModelError

Q95 = float(stats.chi2.ppf(0.95, 1))  # 3.841458820694124
Q50 = float(stats.chi2.ppf(0.50, 1))  # 0.454936423119572 < 1


class Recorder:
    """A profile excess that records where it was evaluated (and may be undefined somewhere)."""

    def __init__(self, f, undefined=lambda x: False):
        self.f, self.undefined, self.at = f, undefined, []

    def __call__(self, x: float) -> float:
        if self.undefined(x):
            raise AssertionError(f"criterion evaluated where it is undefined: {x!r}")
        self.at.append(x)
        return self.f(x)


def quadratic(xhat: float, sd: float) -> Recorder:
    """The deviance excess of a normal likelihood: ((x - xhat) / sd)^2; limits xhat +- sd sqrt(q)."""
    return Recorder(lambda x: ((x - xhat) / sd) ** 2)


# --------------------------------------------------------------------------------------- chi2_cut
def test_chi2_cut_is_the_chi2_1_quantile_and_rejects_levels_outside_0_1():
    assert chi2_cut(0.95) == pytest.approx(1.959963984540054**2, rel=1e-14)
    assert chi2_cut(0.5) == pytest.approx(stats.norm.ppf(0.75) ** 2, rel=1e-14)
    assert DEFAULT_LEVEL == 0.95
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ModelError, match=f"^confidence level must be between 0 and 1, got {bad}$"):
            chi2_cut(bad)


# --------------------------------------------------------------------------------- profile_limit
@pytest.mark.parametrize("direction", [+1, -1])
def test_quadratic_profile_root_and_documented_schedule(direction):
    xhat, sd, step = 1.3, 0.7, 0.1
    ex = quadratic(xhat, sd)
    lim = profile_limit(ex, xhat, Q95, direction, step=step)
    assert lim == ProfileLimit(pytest.approx(xhat + direction * sd * math.sqrt(Q95), abs=1e-10), "root",
                               len(ex.at))
    assert lim.found
    # steps xhat +- 0.1 * 2**k (k = 0..4; the 5th passes the root at distance 1.372), then Brent's
    # method strictly inside the bracket: the bracket's ends are not evaluated again
    grid = [xhat + direction * step * 2**k for k in range(5)]
    assert ex.at[:5] == pytest.approx(grid, abs=1e-15)
    inner = ex.at[5:]
    assert inner and all(min(grid[3:]) < x < max(grid[3:]) for x in inner)


def test_growth_sets_the_step_schedule():
    ex = quadratic(0.0, 1.0)
    lim = profile_limit(ex, 0.0, Q95, +1, step=0.1, growth=3.0)
    assert ex.at[:3] == pytest.approx([0.1, 0.3, 0.9]) and ex.at[3] == pytest.approx(2.7)
    assert lim.value == pytest.approx(math.sqrt(Q95), abs=1e-10)


def test_first_step_crossing_uses_zero_excess_at_the_estimate():
    """With q < 1 the bracket [xhat, xhat + step] is only a sign change if the excess at xhat is 0."""
    ex = quadratic(0.0, 0.01)
    lim = profile_limit(ex, 0.0, Q50, +1, step=0.1)
    assert lim.status == "root" and lim.value == pytest.approx(0.01 * math.sqrt(Q50), abs=1e-13)
    assert 0.0 not in ex.at  # the estimate itself is known (excess 0), never evaluated


def test_root_is_precise_to_the_default_tolerances():
    """Brent's xtol 1e-14 / rtol 1e-11: a root near 1e-3 is found to ~1e-14."""
    ex = Recorder(lambda x: Q95 * (x / 1.234e-3) ** 3)
    lim = profile_limit(ex, 0.0, Q95, +1, step=1e-4)
    assert lim.value == pytest.approx(1.234e-3, abs=3e-14)
    ex = Recorder(lambda x: Q95 * (x / 0.011) ** 3)  # a bracket where xtol decides the last digits
    assert profile_limit(ex, 0.0, Q95, +1, step=3e-4).value == pytest.approx(0.011, abs=2e-14)
    ex = Recorder(lambda x: Q95 * (x / 1234.5) ** 3)
    assert profile_limit(ex, 0.0, Q95, +1, step=10.0).value == pytest.approx(1234.5, rel=5e-11, abs=0)


def test_excess_exactly_at_the_cut_off_is_the_root():
    ex = Recorder(lambda x: Q95 * min(x, 1.0))
    lim = profile_limit(ex, 0.0, Q95, +1, step=0.5)
    assert lim == ProfileLimit(1.0, "root", len(ex.at))


def test_finite_edge_below_the_cut_off_is_the_limit():
    ex = quadratic(0.5, 1.0)  # excess 0.25 at 0
    lim = profile_limit(ex, 0.5, Q95, -1, lower=0.0, step=0.1)
    assert lim == ProfileLimit(0.0, "edge", 1) and ex.at == [0.0] and lim.found
    # the other side has no edge: a root
    assert profile_limit(quadratic(0.5, 1.0), 0.5, Q95, +1, lower=0.0, step=0.1).status == "root"


def test_estimate_on_the_edge_is_the_limit_without_evaluations():
    ex = quadratic(0.0, 1.0)
    assert profile_limit(ex, 0.0, Q95, -1, lower=0.0, step=0.1) == ProfileLimit(0.0, "edge", 0)
    assert profile_limit(ex, 2.0, Q95, +1, upper=2.0, step=0.1) == ProfileLimit(2.0, "edge", 0)
    assert ex.at == []


def test_edge_exactly_at_the_cut_off_is_a_root_not_an_edge():
    ex = Recorder(lambda x: Q95 * (1.0 - x))  # excess q at the edge 0
    lim = profile_limit(ex, 1.0, Q95, -1, lower=0.0, step=0.5)
    assert lim == ProfileLimit(0.0, "root", len(ex.at))
    assert ex.at.count(0.0) == 1


def test_root_between_the_last_step_and_an_edge_above_the_cut_off():
    xhat, sd = 0.5, 0.2
    ex = quadratic(xhat, sd)  # excess 6.25 >= q at 0; root 0.5 - 0.2 * 1.96 = 0.108
    lim = profile_limit(ex, xhat, Q95, -1, lower=0.0, step=0.15)
    assert lim.status == "root" and lim.value == pytest.approx(xhat - sd * math.sqrt(Q95), abs=1e-12)
    assert ex.at[:3] == pytest.approx([0.0, 0.35, 0.2])  # the edge first, then the steps
    assert ex.at.count(0.0) == 1 and all(0.0 < x < 0.2 for x in ex.at[3:])  # the edge is not re-evaluated
    assert lim.evaluations == len(ex.at)


def test_a_step_landing_exactly_on_the_edge_uses_the_edge_value():
    ex = quadratic(0.5, 0.2)
    lim = profile_limit(ex, 0.5, Q95, -1, lower=0.0, step=0.25)  # steps 0.25, then exactly 0.0
    assert lim.value == pytest.approx(0.5 - 0.2 * math.sqrt(Q95), abs=1e-12)
    assert ex.at.count(0.0) == 1


@pytest.mark.parametrize("direction", [+1, -1])
def test_correlation_edges_at_plus_minus_one(direction):
    """A parameter on [-1, 1] (a correlation): the edge in the search direction is evaluated first,
    then the steps; the root lies between the last step and the edge."""
    xhat, sd = 0.5 * direction, 0.25
    ex = quadratic(xhat, sd)  # excess 4 >= q at the edge; root at xhat +- 0.49
    lim = profile_limit(ex, xhat, Q95, direction, lower=-1.0, upper=1.0, step=0.1)
    assert lim.value == pytest.approx(xhat + direction * sd * math.sqrt(Q95), abs=1e-12)
    assert ex.at[:4] == pytest.approx([direction * x for x in (1.0, 0.6, 0.7, 0.9)])
    assert all(0.9 < direction * x < 1.0 for x in ex.at[4:])


def test_edge_where_the_criterion_is_undefined_is_approached_geometrically():
    # profile quadratic in log(x): root exp(-sqrt(q)) = 0.1409, criterion undefined at x <= 0
    ex = Recorder(lambda x: math.log(x) ** 2, undefined=lambda x: x <= 0.0)
    lim = profile_limit(ex, 1.0, Q95, -1, lower=0.0, step=0.3, edge_ok=False)
    assert lim.status == "root" and lim.value == pytest.approx(math.exp(-math.sqrt(Q95)), abs=1e-12)
    # 1 - 0.3, 1 - 0.6, then (1 - 1.2 passes 0) halfway to the edge twice: 0.2, 0.1
    assert ex.at[:4] == pytest.approx([0.7, 0.4, 0.2, 0.1])


def test_a_step_landing_exactly_on_an_undefined_edge_is_not_evaluated():
    ex = Recorder(lambda x: math.log(x / 0.5) ** 2, undefined=lambda x: x <= 0.0)
    lim = profile_limit(ex, 0.5, Q95, -1, lower=0.0, step=0.25, edge_ok=False)
    assert lim.value == pytest.approx(0.5 * math.exp(-math.sqrt(Q95)), abs=1e-12)
    assert ex.at[:2] == [0.25, 0.125]


def test_limit_close_to_an_undefined_edge_is_found():
    """A profile crossing the cut-off at 1e-9 (criterion undefined at 0) is a root, not 'open'."""
    ex = Recorder(lambda x: Q95 * (math.log(x) / math.log(1e-9)) ** 2, undefined=lambda x: x <= 0.0)
    lim = profile_limit(ex, 1.0, Q95, -1, lower=0.0, step=0.25, edge_ok=False)
    assert lim.status == "root" and lim.value == pytest.approx(1e-9, rel=1e-9)


def test_profile_below_the_cut_off_up_to_an_undefined_edge_is_open():
    ex = Recorder(lambda x: 0.5 * (1.0 - x) ** 2, undefined=lambda x: x <= 0.0)
    lim = profile_limit(ex, 1.0, Q95, -1, lower=0.0, step=0.25, edge_ok=False)
    assert lim == ProfileLimit(-math.inf, "open", len(ex.at)) and not lim.found
    # the approach goes down to 1e-12 * max(|xhat|, scale) of the edge before giving up
    assert 5e-13 < min(ex.at) <= 2e-12
    ex = Recorder(lambda x: 0.5 * (1.0 - x / 8.0) ** 2, undefined=lambda x: x <= 0.0)
    profile_limit(ex, 8.0, Q95, -1, lower=0.0, step=0.25, edge_ok=False)
    assert 4e-12 < min(ex.at) <= 1.6e-11
    ex = Recorder(lambda x: 0.5 * (1.0 - x) ** 2, undefined=lambda x: x <= 0.0)
    profile_limit(ex, 1.0, Q95, -1, lower=0.0, step=0.25, edge_ok=False, scale=8.0)
    assert 4e-12 < min(ex.at) <= 1.6e-11
    # the same towards an upper edge
    ex = Recorder(lambda x: 0.5 * x**2, undefined=lambda x: x >= 1.0)
    assert profile_limit(ex, 0.0, Q95, +1, upper=1.0, step=0.25, edge_ok=False).value == math.inf


@pytest.mark.parametrize("xhat,scale,crossing,found", [
    (1.0, 1.0, 0.5e12, True), (1.0, 1.0, 2e12, False),  # ceiling 1e12 * max(|xhat|, scale)
    (3.0, 1.0, 2e12, True), (-3.0, 1.0, 2e12, True), (3.0, 1.0, 4e12, False),
    (1.0, 3.0, 2e12, True), (1.0, 3.0, 4e12, False),
])
def test_default_ceiling_towards_an_infinite_edge(xhat, scale, crossing, found):
    ex = Recorder(lambda x: Q95 * (x - xhat) / (crossing - xhat))
    lim = profile_limit(ex, xhat, Q95, +1, step=1.0, scale=scale)
    if found:
        assert lim.status == "root" and lim.value == pytest.approx(crossing, rel=1e-10)
    else:
        assert lim == ProfileLimit(math.inf, "open", len(ex.at))
        assert max(ex.at) <= 1e12 * max(abs(xhat), scale)
    ex = Recorder(lambda x: Q95 * (xhat - x) / (crossing + xhat))
    lim = profile_limit(ex, xhat, Q95, -1, step=1.0, scale=scale)
    assert lim.found == found and (found or lim.value == -math.inf)


def test_explicit_ceiling():
    ex = Recorder(lambda x: Q95 * x / 50.0)
    # "unreachable only beyond the ceiling": a step exactly at the ceiling is evaluated
    assert profile_limit(ex, 0.0, Q95, +1, step=1.0, ceiling=32.0) == ProfileLimit(math.inf, "open", 6)
    assert ex.at == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert profile_limit(Recorder(lambda x: Q95 * x / 50.0), 0.0, Q95, +1, step=1.0, ceiling=70.0).found


def test_constant_steps_give_up_after_400():
    ex = Recorder(lambda x: 0.5)
    assert profile_limit(ex, 0.0, Q95, -1, step=0.1, growth=1.0) == ProfileLimit(-math.inf, "open", 400)
    assert ex.at[-1] == pytest.approx(-0.1)


def test_log_scale_steps_are_multiplicative():
    xhat, sd = 2.0, 0.3  # profile quadratic in log(x): limits xhat * exp(+-sd sqrt(q))
    for direction in (-1, +1):
        ex = Recorder(lambda x: ((math.log(x) - math.log(xhat)) / sd) ** 2, undefined=lambda x: x <= 0.0)
        lim = profile_limit(ex, xhat, Q95, direction, lower=0.0, step=0.05, log_scale=True, edge_ok=False)
        assert lim.value == pytest.approx(xhat * math.exp(direction * sd * math.sqrt(Q95)), rel=1e-11)
        assert ex.at[:4] == pytest.approx([xhat * math.exp(direction * 0.05 * 2**k) for k in range(4)])


def test_log_scale_with_the_criterion_defined_at_zero():
    ex = Recorder(lambda x: ((math.log(x + 0.01) - math.log(2.01)) / 0.5) ** 2)
    lim = profile_limit(ex, 2.0, Q95, -1, lower=0.0, step=0.05, log_scale=True)
    assert ex.at[0] == 0.0 and ex.at[1] == pytest.approx(2.0 * math.exp(-0.05))
    assert lim.value == pytest.approx(2.01 * math.exp(-0.5 * math.sqrt(Q95)) - 0.01, abs=1e-12)


def test_log_scale_far_below_the_estimate_reaches_the_edge():
    """Steps more than e^-700 below the estimate go to the edge: the profile stays below the cut-off
    down to x = 0+ and jumps above it at 0, so the root is between the last step and the edge."""
    ex = Recorder(lambda x: 2.0 * Q95 if x == 0.0 else 0.0)
    step = 700.5 / 512  # the 10th step is e^-700.5 below the estimate: the edge
    lim = profile_limit(ex, 1.0, Q95, -1, lower=0.0, step=step, log_scale=True)
    assert lim.status == "root" and 0.0 <= lim.value < math.exp(-350)
    assert ex.at[:10] == pytest.approx([0.0] + [math.exp(-step * 2**k) for k in range(9)], rel=1e-12, abs=0)
    assert ex.at.count(0.0) == 1 and min(x for x in ex.at if x > 0.0) > math.exp(-700)  # not e^-700.5


def test_log_scale_open_towards_infinity():
    ex = Recorder(lambda x: 0.5 * (1.0 - math.exp(-x)))
    lim = profile_limit(ex, 1.0, Q95, +1, lower=0.0, step=0.5, log_scale=True)
    assert lim == ProfileLimit(math.inf, "open", len(ex.at)) and max(ex.at) <= 1e12


def test_log_scale_from_an_estimate_at_zero_steps_up_from_scale():
    ex = quadratic(0.0, 1.0)
    lim = profile_limit(ex, 0.0, Q95, +1, lower=0.0, step=0.05, log_scale=True, scale=0.25)
    assert ex.at[:4] == [0.25, 0.5, 1.0, 2.0] and lim.value == pytest.approx(math.sqrt(Q95), abs=1e-12)
    ex = quadratic(0.0, 1.0)
    profile_limit(ex, 0.0, Q95, +1, lower=0.0, step=0.05, log_scale=True)
    assert ex.at[:2] == [1.0, 2.0]  # default scale 1
    assert profile_limit(quadratic(0.0, 1.0), 0.0, Q95, -1, step=0.1, log_scale=True) == ProfileLimit(
        -math.inf, "open", 0)


def test_profile_interval_orders_the_ends_and_uses_the_level():
    lo, hi = profile_interval(quadratic(1.0, 0.5), 1.0, 0.5, step=0.1)
    assert (lo.value, hi.value) == pytest.approx((1.0 - 0.5 * math.sqrt(Q50), 1.0 + 0.5 * math.sqrt(Q50)),
                                                 abs=1e-12)
    # each end is profile_limit's in its direction (same schedule: same evaluations, same digits)
    assert lo == profile_limit(quadratic(1.0, 0.5), 1.0, Q50, -1, step=0.1)
    assert hi == profile_limit(quadratic(1.0, 0.5), 1.0, Q50, +1, step=0.1)
    lo, hi = profile_interval(quadratic(1.0, 0.6), 1.0, 0.95, step=0.1, lower=0.0)  # excess 2.8 at 0
    assert (lo.status, hi.status) == ("edge", "root") and lo.value == 0.0


def test_profile_end_positive_and_real_line():
    ex = Recorder(lambda x: ((math.log(x) - math.log(2.0)) / 0.3) ** 2, undefined=lambda x: x <= 0.0)
    end, found = profile_end(ex, 2.0, Q95, -1, positive=True, step=0.05)
    assert found and end == pytest.approx(2.0 * math.exp(-0.3 * math.sqrt(Q95)), rel=1e-11)
    assert ex.at[0] == pytest.approx(2.0 * math.exp(-0.05))  # log-scale steps, the edge 0 not evaluated
    # zero_allowed: the edge is evaluated and is the end when below the cut-off
    assert profile_end(quadratic(0.5, 1.0), 0.5, Q95, -1, positive=True, step=0.05,
                       zero_allowed=True) == (0.0, True)
    # estimate 0: steps up from scale
    ex = quadratic(0.0, 1.0)
    end, found = profile_end(ex, 0.0, Q95, +1, positive=True, step=0.05, zero_allowed=True, scale=0.5)
    assert found and end == pytest.approx(math.sqrt(Q95), abs=1e-12) and ex.at[:2] == [0.5, 1.0]
    ex = quadratic(0.0, 1.0)
    profile_end(ex, 0.0, Q95, +1, positive=True, step=0.05, zero_allowed=True)
    assert ex.at[:2] == [1.0, 2.0]  # default scale 1
    ex = quadratic(-3.0, 2.0)
    end, found = profile_end(ex, -3.0, Q95, -1, positive=False, step=0.1)
    assert found and end == pytest.approx(-3.0 - 2.0 * math.sqrt(Q95), abs=1e-11)
    assert ex.at[0] == pytest.approx(-3.1)
    end, found = profile_end(Recorder(lambda x: 0.0), 1.0, Q95, +1, positive=True, step=0.5)
    assert (end, found) == (math.inf, False)


# --------------------------------------------------------------------------- Wald and percentile
def test_wald_interval_is_estimate_plus_minus_normal_quantile():
    lo, hi = wald_interval(np.array([1.0, -2.0]), np.array([0.5, 0.1]))
    z = stats.norm.ppf(0.975)
    np.testing.assert_allclose(lo, [1.0 - z * 0.5, -2.0 - z * 0.1], rtol=1e-14)
    np.testing.assert_allclose(hi, [1.0 + z * 0.5, -2.0 + z * 0.1], rtol=1e-14)
    # plain float arrays also from an object column (e.g. read from JSON with missing values)
    lo, hi = wald_interval(pd.Series([1.0, 2.0], dtype=object), pd.Series([0.5, 0.5], dtype=object))
    assert lo.dtype == hi.dtype == np.float64
    lo, hi = wald_interval(3, 2, 0.8)
    assert (float(lo), float(hi)) == pytest.approx((3 - 2 * stats.norm.ppf(0.9), 3 + 2 * stats.norm.ppf(0.9)),
                                                   rel=1e-14)


def test_percentile_interval_of_the_finite_values():
    x = np.r_[np.arange(101.0), np.nan, np.inf, -np.inf]
    assert percentile_interval(x) == pytest.approx((2.5, 97.5), abs=1e-12)
    assert percentile_interval(list(x), 0.9) == pytest.approx((5.0, 95.0), abs=1e-12)
    assert percentile_interval([np.int64(1), np.int64(3)], 0.5) == (1.5, 2.5)
    assert percentile_interval(pd.Series([1.0, None, 3.0], dtype=object), 0.5) == (1.5, 2.5)
    lo, hi = percentile_interval([np.nan, np.inf])
    assert math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in percentile_interval([]))


# ------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_rng_seed_rule():
    assert bootstrap_rng(None).random(3).tolist() == np.random.default_rng(0).random(3).tolist()
    assert bootstrap_rng(7).random(3).tolist() == np.random.default_rng(7).random(3).tolist()
    assert bootstrap_rng(np.int64(7)).random() == np.random.default_rng(7).random()


def _mean_refit(x):
    return {"m": float(np.mean(x))}


def test_bootstrap_draws_follow_the_seed_rule_with_one_generator():
    res = parametric_bootstrap(lambda rng: rng.normal(size=4), _mean_refit, 5, 3, ["m"])
    rng = np.random.default_rng(3)  # one generator for all replicates, in order
    expected = [float(np.mean(rng.normal(size=4))) for _ in range(5)]
    assert res.draws["m"].tolist() == expected and res.n_boot == 5 and res.n_failed == 0
    assert list(res.draws.columns) == ["m"]
    one = parametric_bootstrap(lambda rng: rng.normal(size=4), _mean_refit, 1, None, ["m"])
    assert one.n_boot == 1 and one.draws["m"].tolist() == [float(np.mean(np.random.default_rng(0).normal(size=4)))]
    assert parametric_bootstrap(lambda rng: rng.normal(size=4), _mean_refit, 2.0, 3, ["m"]).n_boot == 2


@pytest.mark.parametrize("n_boot", [0, -1])
def test_bootstrap_needs_a_positive_number_of_refits(n_boot):
    with pytest.raises(ModelError, match=f"^n_boot must be a positive integer, got {n_boot}$"):
        parametric_bootstrap(lambda rng: 0, _mean_refit, n_boot, 0, ["m"])


@pytest.mark.parametrize("error", [ZeroDivisionError, FloatingPointError, ValueError, np.linalg.LinAlgError])
def test_bootstrap_counts_refits_that_raise_numerical_errors(error):
    def refit(i):
        if i % 3 == 0:
            raise error("refit failed")
        return {"m": float(i)}

    res = parametric_bootstrap(_counter(), refit, 7, 0, ["m"])  # replicates 0..6: 0, 3, 6 fail
    assert res.n_failed == 3
    assert res.draws["m"].isna().tolist() == [True, False, False, True, False, False, True]
    assert res.draws["m"].dropna().tolist() == [1.0, 2.0, 4.0, 5.0]


def test_bootstrap_lets_programming_errors_through():
    def refit(i):
        raise TypeError("a bug, not a failed refit")

    with pytest.raises(TypeError):
        parametric_bootstrap(_counter(), refit, 3, 0, ["m"])


def _counter():
    """simulate(): the replicate number (0, 1, 2, ...), independent of the generator."""
    state = {"i": -1}

    def simulate(rng):
        state["i"] += 1
        return state["i"]

    return simulate


def test_bootstrap_failure_accounting_and_flags():
    rows = {
        0: {"m": 1.0, "c": 0.5, "converged": True, "singular": True},
        1: {"m": 2.0, "c": 0.1, "converged": False, "singular": False},  # not converged: failed
        2: {"m": np.inf, "c": 0.1},  # non-finite: failed
        3: {"c": 0.2},  # missing column: failed
        4: {"m": 5.0, "c": 0.3},  # converged not reported: a success
        5: {"m": 6.0, "c": 0.4, "correlation": np.nan, "singular": True},  # NaN correlation allowed
        6: {"m": 7.0, "c": np.nan},  # NaN in another column: failed
    }
    res = parametric_bootstrap(_counter(), rows.__getitem__, 7, 0, ["m", "c"], flags=("converged", "singular"))
    assert res.n_failed == 4 and res.n_boot == 7
    assert list(res.draws.columns) == ["m", "c", "converged", "singular"]
    assert res.draws["m"].tolist()[:1] == [1.0] and res.draws["m"].iloc[4:6].tolist() == [5.0, 6.0]
    assert res.draws[["m", "c"]].isna().all(axis=1).tolist() == [False, True, True, True, False, False, True]
    # flags are copied as reported (absent: False), failed refits included
    assert res.draws["converged"].tolist() == [True, False, False, False, False, False, False]
    assert res.draws["singular"].tolist() == [True, False, False, False, False, True, False]
    rows = {0: {"m": 1.0, "correlation": np.nan}, 1: {"m": np.nan, "correlation": 0.5}}
    res = parametric_bootstrap(_counter(), rows.__getitem__, 2, 0, ["m", "correlation"])
    assert res.n_failed == 1  # a NaN correlation (a singular refit) is allowed, a NaN elsewhere is not
    assert res.draws["m"].iloc[0] == 1.0 and res.draws["m"].isna().tolist() == [False, True]


def test_bootstrap_result_interval_is_the_percentile_interval_of_a_column():
    res = parametric_bootstrap(_counter(), lambda i: {"m": float(i), "k": -float(i)}, 11, 0, ["m", "k"])
    assert res.interval("m") == pytest.approx((0.25, 9.75), abs=1e-12)
    assert res.interval("k", 0.5) == pytest.approx((-7.5, -2.5), abs=1e-12)
    assert isinstance(res.draws, pd.DataFrame)
