"""Tests that kill mutants of the Gaussian engine (engine/gaussian.py, engine/derivatives.py) found by
``MUTATION_SAMPLE=... tools/mutation.sh gaussian|derivatives``: each value is checked against an
independent truth (closed forms of the balanced one-way ANOVA, dense-matrix ``V`` computations in numpy
or finite differences), never against the engine itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

from test_engine_blocks import _check, _criterion, _data, _dense
from test_mutation_kills_reml import _dense_loglik
from therapist_effects.engine import gaussian as gs
from therapist_effects.engine.derivatives import slope_deviance
from therapist_effects.engine.gaussian import BlockEngine, centre_design, theta_lower_bounds, theta_to_lambda

LOG2PI = math.log(2.0 * math.pi)


def _balanced(seed: int, G: int = 9, m: int = 6, tau: float = 1.0):
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(G), m)
    y = 10.0 + tau * rng.normal(size=G)[codes] + rng.normal(size=G * m)
    return y, codes


def _anova(y, codes, G, m):
    means = np.bincount(codes, weights=y) / m
    msb = m * np.sum((means - y.mean()) ** 2) / (G - 1)
    msw = np.sum((y - means[codes]) ** 2) / (G * (m - 1))
    return means, msb, msw


def _intercept_engine(y, codes, G):
    n = len(y)
    return BlockEngine(y, np.ones((n, 1)), np.ones((n, 1)), codes, G)


@pytest.mark.parametrize("seed", [0, 3])
def test_balanced_one_way_reml_and_ml_optima_are_the_anova_closed_forms(seed):
    """REML: sigma2 = MSW, tau2 = (MSB - MSW) / m; ML: tau2 = ((1 - 1/G) MSB - MSW) / m (both interior)."""
    G, m = 9, 6
    y, codes = _balanced(seed, G, m)
    means, msb, msw = _anova(y, codes, G, m)
    assert msb > 2 * msw  # interior optimum for both criteria
    eng = _intercept_engine(y, codes, G)
    theta, fmin, ok = eng.fit(reml=True)
    assert ok
    s2 = eng.scale(theta, True)
    assert s2 == pytest.approx(msw, rel=1e-6)
    assert theta[0] ** 2 * s2 == pytest.approx((msb - msw) / m, rel=1e-5)
    assert fmin == pytest.approx(eng.crit(theta, True), rel=1e-12)
    theta_ml, _, ok = eng.fit(reml=False)
    assert ok
    s2_ml = eng.scale(theta_ml, False)
    assert s2_ml == pytest.approx(msw, rel=1e-6)
    assert theta_ml[0] ** 2 * s2_ml == pytest.approx(((1 - 1 / G) * msb - msw) / m, rel=1e-5)


def test_balanced_fixed_effect_blups_and_ml_deviance_by_hand():
    """GLS mean = grand mean with unscaled variance (1 + m theta^2) / (G m); BLUPs shrink the therapist
    means by m tau2 / (sigma2 + m tau2); dev_ml equals the dense Gaussian log-likelihood."""
    G, m = 7, 5
    y, codes = _balanced(11, G, m, tau=0.8)
    means, _, _ = _anova(y, codes, G, m)
    eng = _intercept_engine(y, codes, G)
    theta = np.array([0.7])
    b, cov, r, bc = eng.fixed(theta)
    assert b[0] == pytest.approx(y.mean(), rel=1e-12)
    assert cov[0, 0] == pytest.approx((1 + m * 0.49) / (G * m), rel=1e-12)
    sigma2 = 1.3
    u, ucov = eng.blups(theta, bc, sigma2)
    tau2 = 0.49 * sigma2
    shrink = m * tau2 / (sigma2 + m * tau2)
    np.testing.assert_allclose(u[:, 0], shrink * (means - y.mean()), rtol=1e-10)
    np.testing.assert_allclose(ucov[:, 0, 0], tau2 * sigma2 / (sigma2 + m * tau2), rtol=1e-10)
    n = G * m
    V = sigma2 * (np.eye(n) + 0.49 * (codes[:, None] == codes[None, :]))
    e = y - y.mean()
    dense = n * LOG2PI + np.linalg.slogdet(V)[1] + e @ np.linalg.solve(V, e)
    assert eng.dev_ml(theta, sigma2) == pytest.approx(dense, rel=1e-12)


# -- the optimisers and finite differences, on functions whose minima and derivatives are known exactly --
A = np.array([[3.0, 1.0, 0.5], [1.0, 2.0, -0.3], [0.5, -0.3, 1.5]])
XSTAR = np.array([0.7, -0.4, 1.2])


def _quartic(x):
    """Quadratic bowl plus a quartic term: minimum at XSTAR, value 1."""
    d = np.asarray(x) - XSTAR
    return float(1.0 + 0.5 * d @ A @ d + 0.1 * d[0] ** 4)


def _quartic_derivs(x):
    d = np.asarray(x) - XSTAR
    g = A @ d + np.array([0.4 * d[0] ** 3, 0.0, 0.0])
    H = A + np.diag([1.2 * d[0] ** 2, 0.0, 0.0])
    return g, H


def test_fd_derivatives_and_gradient_are_exact_on_a_quartic():
    """Richardson-extrapolated central differences are exact (to rounding) for a polynomial of degree 4;
    the Hessian's second differences leave an h^2 error from the quartic term only (coordinate 0)."""
    x = np.array([1.1, 0.3, -0.2])
    h = np.array([1e-3, 2e-3, 1.5e-3])
    g_true, H_true = _quartic_derivs(x)
    g, H = gs.fd_derivatives(_quartic, x, h, [0, 1, 2])
    np.testing.assert_allclose(g, g_true, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(H, H_true, rtol=1e-5, atol=1e-5)
    g2, H2 = gs.fd_derivatives(_quartic, x, h, [0, 2], _quartic(x))
    np.testing.assert_allclose(g2, g_true[[0, 2]], rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(H2, H_true[np.ix_([0, 2], [0, 2])], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gs._fd_gradient(_quartic, x, h), g_true, rtol=1e-7, atol=1e-8)


def test_newton_minimise_reaches_the_minimum_and_hands_back_its_hessian():
    hess: dict = {}
    x, f, ok = gs.newton_minimise(_quartic, XSTAR + 0.3, np.full(3, -5.0), np.full(3, 5.0), hess=hess)
    assert ok
    np.testing.assert_allclose(x, XSTAR, atol=1e-7)
    assert f == pytest.approx(1.0, abs=1e-13)
    np.testing.assert_allclose(hess["H"], A, rtol=0.05, atol=0.05)
    # warm start with that Hessian: BFGS steps from it reach the same point
    x2, _, ok2 = gs.newton_minimise(_quartic, XSTAR - 0.2, np.full(3, -5.0), hess={"H": A.copy()})
    assert ok2
    np.testing.assert_allclose(x2, XSTAR, atol=1e-7)
    # a start outside the box, or a minimum beyond a bound: no answer vouched for
    assert gs.newton_minimise(_quartic, np.full(3, 6.0), np.full(3, -5.0), np.full(3, 5.0))[2] is False
    lows = np.array([1.0, -5.0, -5.0])  # the minimum's x0 = 0.7 lies below the bound
    assert gs.newton_minimise(_quartic, np.array([1.2, 0.0, 1.0]), lows, np.full(3, 5.0))[2] is False


def test_box_minimisers_stop_exactly_on_an_active_bound():
    """With x0 >= 1 the minimum of the bowl is on the face x0 = 1: the other coordinates solve
    A[1:, 1:] d = -A[1:, 0] (1 - 0.7) (the quartic term is constant on the face)."""
    lows = np.array([1.0, -5.0, -5.0])
    ups = np.array([5.0, 5.0, 5.0])
    d0 = 1.0 - XSTAR[0]
    rest = XSTAR[1:] + np.linalg.solve(A[1:, 1:], -A[1:, 0] * d0)
    expect = np.concatenate([[1.0], rest])
    for x, f, ok in (gs.minimise_box(_quartic, np.array([2.0, 0.0, 0.0]), lows, ups),
                     gs.newton_box(lambda z: (_quartic(z), *_quartic_derivs(z)), np.array([2.0, 0.0, 0.0]), lows, ups)):
        assert x[0] == 1.0
        np.testing.assert_allclose(x, expect, atol=1e-6)
        assert f == pytest.approx(_quartic(expect), abs=1e-11)
    assert gs.newton_box(lambda z: (_quartic(z), *_quartic_derivs(z)), np.array([2.0, 0.0, 0.0]), lows, ups)[2]
    # interior minimum: found to ~1e-9 by Nelder-Mead + Newton polish
    x, f, ok = gs.minimise_box(_quartic, np.zeros(3), np.full(3, -5.0), ups)
    assert ok
    np.testing.assert_allclose(x, XSTAR, atol=1e-7)


def test_newton_minimise_respects_both_bounds_at_their_margin():
    """It vouches for an answer only when the finite-difference points (2 h, h = 1e-3 max(|x|, 0.1)) stay
    in the box: a bound 1.8e-3 from the minimum (|x| = 0.7, 2 h = 1.4e-3) leaves it free, a bound 1e-3
    from it does not; an upper bound below the minimum is never crossed."""
    far = np.full(3, 5.0)
    start = XSTAR + 0.3
    for lows, ups in (((XSTAR[0] - 1.8e-3), 5.0), (-5.0, XSTAR[0] + 1.8e-3)):
        x, _, ok = gs.newton_minimise(_quartic, np.r_[XSTAR[0], start[1:]], np.r_[lows, -far[1:]],
                                      np.r_[ups, far[1:]])
        assert ok
        np.testing.assert_allclose(x, XSTAR, atol=1e-7)
    assert gs.newton_minimise(_quartic, np.r_[XSTAR[0], start[1:]], -far, np.r_[XSTAR[0] + 1e-3, far[1:]])[2] is False
    x, _, ok = gs.newton_minimise(_quartic, np.zeros(3), -far, np.r_[0.5, far[1:]])
    assert not ok and x[0] <= 0.5


def test_newton_minimise_recovers_from_a_bad_hessian_and_flags_too_few_iterations():
    hess = {"H": -np.eye(3)}  # not positive definite: the retry takes a fresh finite-difference Hessian
    x, _, ok = gs.newton_minimise(_quartic, XSTAR + 0.3, np.full(3, -5.0), hess=hess)
    assert ok
    np.testing.assert_allclose(x, XSTAR, atol=1e-7)
    assert gs.newton_minimise(_quartic, XSTAR + 0.3, np.full(3, -5.0), max_iter=1)[2] is False


def test_box_minimisers_at_a_corner_and_in_one_dimension():
    """The minimum at a corner of the box (every coordinate on a bound): minimise_box returns the corner
    and the criterion there; newton_box in one dimension."""
    lows, ups = np.array([1.0, 0.0, 1.5]), np.array([5.0, 5.0, 5.0])
    corner = np.array([1.0, 0.0, 1.5])
    g, _ = _quartic_derivs(corner)
    assert np.all(g > 0)  # the gradient points out of the box at the corner
    x, f, _ = gs.minimise_box(_quartic, np.array([3.0, 3.0, 3.0]), lows, ups)
    np.testing.assert_allclose(x, corner, atol=1e-9)
    assert np.all(x >= lows) and f == pytest.approx(_quartic(x), rel=1e-15)

    def fgh(z):
        d = z[0] - 0.3
        return float(d**2 + d**4), np.array([2 * d + 4 * d**3]), np.array([[2 + 12 * d**2]])

    x, f, ok = gs.newton_box(fgh, np.array([2.5]), np.array([-1.0]), np.array([3.0]))
    assert ok and x[0] == pytest.approx(0.3, abs=1e-6) and f == pytest.approx(0.0, abs=1e-11)
    x, f, ok = gs.newton_box(fgh, np.array([2.5]), np.array([0.5]), np.array([3.0]))
    assert ok and x[0] == 0.5


def test_criterion_of_rarer_layouts_equals_the_dense_computation():
    """q = 3 without strata or cluster level, q = 1 with a slope column only, q = 1 with residual strata
    where the last therapist has no patient in the last stratum (also with a cluster level)."""
    y, X, codes, cluster, arm = _data(9)
    G = codes.max() + 1
    th3 = np.array([0.8, 0.2, -0.3, 0.6, 0.1, 0.5])
    _check(BlockEngine(y, X, X, codes, G), th3, theta_to_lambda(th3, 3), y, X, X, codes)
    Zs = X[:, [1]]
    _check(BlockEngine(y, X, Zs, codes, G), np.array([0.7]), np.array([[0.7]]), y, X, Zs, codes)
    strata = arm.copy()
    strata[codes == G - 1] = 0
    ones = np.ones((len(y), 1))
    eng = BlockEngine(y, X, ones, codes, G, strata=strata)
    _check(eng, np.array([0.9]), np.array([[0.9]]), y, X, ones, codes, strata=strata, ratios=np.array([1.0, 2.5]))
    eng = BlockEngine(y, X, ones, codes, G, cluster=cluster, strata=strata)
    _check(eng, np.array([0.9, 0.6]), np.array([[0.9]]), y, X, ones, codes, cluster, strata, np.array([1.0, 2.5]))


def test_cluster_level_fit_is_the_dense_reml_optimum_with_an_exact_zero():
    """BlockEngine.fit with a cluster level: the REML (not ML) optimum of the dense likelihood; data
    without a therapist effect put the therapist theta at exactly 0."""
    rng = np.random.default_rng(21)
    C, per, m = 6, 4, 5
    G = C * per
    cl = np.repeat(np.arange(C), per)
    codes = np.repeat(np.arange(G), m)
    n = len(codes)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = X @ [1.0, 0.5] + 1.5 * rng.normal(size=C)[cl[codes]] + rng.normal(size=n)
    eng = BlockEngine(y, X, np.ones((n, 1)), codes, G, cluster=cl)
    theta, fmin, _ = eng.fit(True)
    assert theta[0] == 0.0 and theta[1] > 0.5
    s2 = eng.scale(theta, True)
    same_c = cl[codes][:, None] == cl[codes][None, :]

    def ll(vc, s):
        return _dense_loglik(y, X, s * np.eye(n) + vc * same_c, True)

    best = ll(theta[1] ** 2 * s2, s2)
    assert -0.5 * fmin == pytest.approx(best, rel=1e-10)
    for dc, ds in ((1.02, 1), (0.98, 1), (1, 1.02), (1, 0.98)):
        assert ll(theta[1] ** 2 * s2 * dc, s2 * ds) < best


def test_slope_deviance_is_infinite_with_nan_derivatives_where_undefined():
    """An SD of exp(800) overflows: the criterion is +inf with NaN gradient (4) and Hessian (4 x 4), as
    the engine's own criterion there, for every criterion."""
    y, X, codes, _, _ = _data(4)
    eng = BlockEngine(y, X, X[:, [0, 1]], codes, codes.max() + 1)
    for criterion in ("ml", "profiled_ml", "profiled_reml"):
        f, g, H = slope_deviance(eng, np.array([800.0, 0.0, 0.2, 0.0]), criterion)
        assert f == math.inf and g.shape == (4,) and H.shape == (4, 4)
        assert np.isnan(g).all() and np.isnan(H).all()
    with pytest.raises(ValueError, match="unknown criterion"):
        slope_deviance(eng, np.array([0.0, 0.0, 0.2, 0.0]), "reml")


def test_box_minimiser_vouches_for_a_bound_beyond_which_the_criterion_falls_without_limit():
    """``f = x0 + (x1 - x0 / 2 - 0.5)^2`` falls without limit as x0 -> -inf: on the box x0 >= 0 its minimum
    is x0 = 0, x1 = 0.5, f = 0, and the Nelder-Mead stage must search the box, not the whole line
    (there it never converges)."""
    def f(x):
        return float(x[0] + (x[1] - x[0] / 2 - 0.5) ** 2)

    x, fx, ok = gs.minimise_box(f, np.array([1.0, 0.0]), np.array([0.0, -np.inf]))
    assert ok and x[0] == 0.0
    assert x[1] == pytest.approx(0.5, abs=1e-9) and fx == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("side", ["upper", "lower"])
def test_box_minimiser_never_evaluates_the_criterion_outside_the_box(side):
    """A criterion undefined outside the box (it raises there) with its minimum on a bound: ``f = (x0 - 2)^2
    + (x1 - x0 / 2)^2`` on x0 <= 1 (minimum x0 = 1, x1 = 0.5, f = 1) or on x0 >= 3 (x0 = 3, x1 = 1.5, f = 1).
    The Newton polish holds a coordinate within two finite-difference steps of its bound, so neither
    stage evaluates ``f`` outside the box, and the free coordinate is polished to the exact minimum."""
    bound = 1.0 if side == "upper" else 3.0
    lows, ups = (np.array([-5.0, -5.0]), np.array([bound, 5.0])) if side == "upper" else \
        (np.array([bound, -5.0]), np.array([5.0, 5.0]))

    def f(x):
        assert np.all(x >= lows) and np.all(x <= ups), x
        return float((x[0] - 2.0) ** 2 + (x[1] - x[0] / 2) ** 2)

    x, fx, ok = gs.minimise_box(f, np.array([2.0, 0.0]), lows, ups)
    assert x[0] == bound
    assert x[1] == pytest.approx(bound / 2, abs=1e-10) and fx == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize(("f", "x0", "xmin", "fmin"), [
    (lambda x: float(np.cosh(x[0]) + np.cosh(2 * x[1]) + np.cosh(3 * x[2]) + x[0] * x[2]),
     np.array([0.3, 0.2, -0.1]), np.zeros(3), 3.0),
    (lambda x: float(np.exp(x[0]) - 2 * x[0] + np.cosh(x[1] - x[0])),
     np.array([1.0, 0.5]), np.full(2, math.log(2.0)), 3.0 - 2.0 * math.log(2.0)),
])
def test_newton_minimise_does_not_depend_on_the_units_of_the_criterion(f, x0, xmin, fmin):
    """Scaling the criterion by a power of two scales every difference, gradient, Hessian and BFGS update
    exactly, so the quasi-Newton path is the same bit for bit (its curvature test is relative); the minima
    are known in closed form (cosh terms: 0; exp(a) - 2a: a = log 2)."""
    paths = []
    for c in (1.0, 2.0**-30, 2.0**20):
        calls = []

        def fc(x, c=c, calls=calls):
            calls.append(x.copy())
            return c * f(x)

        x, fx, ok = gs.newton_minimise(fc, x0, np.full(len(x0), -10.0))
        assert ok
        np.testing.assert_allclose(x, xmin, atol=1e-8)
        assert fx / c == pytest.approx(fmin, rel=1e-14)
        paths.append(np.array(calls))
    for other in paths[1:]:
        np.testing.assert_array_equal(other, paths[0])


def test_centre_design_centres_every_column_but_the_intercept():
    """``Xc = X S`` with the covariates centred at their means and the intercept column (here the second)
    kept; a design without an intercept column, or without rows, is left as it is."""
    X = np.array([[2.0, 1.0, 5.0], [4.0, 1.0, 6.0], [9.0, 1.0, 1.0]])
    Xc, S, k0 = centre_design(X)
    assert k0 == 1
    np.testing.assert_allclose(Xc, [[-3.0, 1.0, 1.0], [-1.0, 1.0, 2.0], [4.0, 1.0, -3.0]], atol=1e-14)
    np.testing.assert_allclose(X @ S, Xc, atol=1e-14)
    for A in (X[:, [0, 2]], np.empty((0, 2))):
        Ac, S, k0 = centre_design(A)
        assert k0 is None and Ac is A and np.array_equal(S, np.eye(2))


def test_theta_lower_bounds_are_lme4s_and_an_off_diagonal_theta_can_be_negative():
    """lme4's ``lower`` for (1 + x | g) and (1 + x + z | g): 0 on the diagonal of Lambda, -Inf below it; a
    minimum whose off-diagonal theta is negative is found there."""
    assert theta_lower_bounds(2).tolist() == [0.0, -math.inf, 0.0]
    assert theta_lower_bounds(3).tolist() == [0.0, -math.inf, -math.inf, 0.0, -math.inf, 0.0]
    target = np.array([0.8, -0.6, 0.5])
    x, f, ok = gs.minimise_theta(lambda t: float(np.sum(np.array([1.0, 2.0, 3.0]) * (t - target) ** 2)),
                                 np.array([1.0, 0.0, 1.0]), 2)
    assert ok
    np.testing.assert_allclose(x, target, atol=1e-7)
    assert f == pytest.approx(0.0, abs=1e-12)


def test_batch_criterion_with_a_cluster_level_equals_the_dense_computation():
    """The random intercept's batch criterion (sums over caseloads and clusters) row by row against dense
    matrices, for REML and ML (batches whose every row has a Cholesky factor, and one with a row without:
    computed row by row); an undefined theta (NaN) is +inf, and so is a residual variance <= 0."""
    y, X, codes, cluster, _ = _data(5)
    n, p = X.shape
    ones = np.ones((n, 1))
    eng = BlockEngine(y, X, ones, codes, codes.max() + 1, cluster=cluster)
    thetas = np.array([[0.9, 0.6], [0.0, 1.3], [1.4, 0.0], [0.7, 0.05], [1.1, 0.02]])
    for reml in (True, False):
        dense = []
        for t in thetas:
            r, ldx, ldv, _, _ = _dense(y, X, ones, codes, np.array([[t[0]]]), cluster, t[1] ** 2)
            dense.append(_criterion(r, ldx, ldv, n, p, reml))
        np.testing.assert_allclose(eng.crit_many(thetas, reml), dense, rtol=1e-10)
        np.testing.assert_allclose(eng.crit_many(thetas[3:], reml), dense[3:], rtol=1e-10)
        # a cluster SD of 1e8 leaves the system without a Cholesky factor: that row is +inf, the others exact
        got = eng.crit_many(np.array([[0.5, 1e8], [0.7, 0.05]]), reml)
        assert got[0] == math.inf and got[1] == pytest.approx(dense[3], rel=1e-10)
        assert eng.crit_many(np.array([[np.nan, 0.5], [0.5, 0.5]]), reml)[0] == math.inf
        for sigma2 in (0.0, -1.0):
            assert eng.crit(thetas[0], reml, sigma2=sigma2) == math.inf
            assert eng.dev_ml(thetas[0], sigma2) == math.inf
    # a random slope (no caseload sums): row by row
    Z = X[:, :2]
    slope = BlockEngine(y, X, Z, codes, codes.max() + 1)
    th2 = np.array([[0.9, 0.2, 0.4], [0.5, -0.3, 0.1]])
    r, ldx, ldv, _, _ = _dense(y, X, Z, codes, theta_to_lambda(th2[1], 2))
    assert slope.crit_many(th2, True)[1] == pytest.approx(_criterion(r, ldx, ldv, n, p, True), rel=1e-10)


def test_newton_minimise_takes_a_handed_over_hessian_of_the_right_shape_instead_of_differences():
    """With ``hess["H"]`` of the right shape the first iterate needs the gradient only (4 evaluations a
    coordinate) instead of the finite-difference Hessian (4 a coordinate and 4 a pair); a Hessian of
    another shape (another problem) is ignored. The same minimum either way."""
    counts = []
    for hess in (None, {"H": A.copy()}, {"H": np.eye(2)}):
        calls = []

        def f(x, calls=calls):
            calls.append(1)
            return _quartic(x)

        x, _, ok = gs.newton_minimise(f, XSTAR + 0.3, np.full(3, -5.0), hess=hess)
        assert ok
        np.testing.assert_allclose(x, XSTAR, atol=1e-7)
        counts.append(len(calls))
    assert counts[1] < counts[0] == counts[2]



def test_newton_minimise_on_a_convex_quadratic_needs_no_finite_difference_hessian(monkeypatch):
    """From a handed-over positive definite Hessian (here the identity, not the quadratic's), BFGS updates
    of a convex quadratic stay positive definite (s'y = s'As > 0), so no quasi-Newton step fails and no
    finite-difference Hessian is computed; the minimum is exact and the Hessian handed back positive
    definite."""
    Aq = np.array([[4.0, 1.0], [1.0, 2.0]])
    xstar = np.array([0.3, -0.2])

    def f(x):
        d = x - xstar
        return float(0.5 * d @ Aq @ d + 1.0)

    def no_fd(*args, **kwargs):
        raise AssertionError("finite-difference Hessian computed")

    monkeypatch.setattr(gs, "fd_derivatives", no_fd)
    hess = {"H": np.eye(2)}
    x, fx, ok = gs.newton_minimise(f, np.array([1.0, 1.0]), np.full(2, -5.0), hess=hess)
    assert ok
    np.testing.assert_allclose(x, xstar, atol=1e-9)
    assert fx == pytest.approx(1.0, abs=1e-14)
    assert np.all(np.linalg.eigvalsh(hess["H"]) > 0)

def test_random_slope_fit_is_the_minimum_of_the_dense_criterion():
    """BlockEngine.fit of (1 + x | therapist) (unstructured, optimised on the centred scale and reported
    as lme4's theta of the model as given): the dense REML criterion at the reported theta is the
    engine's minimum, and moving any theta element by 1e-3 either way increases it."""
    rng = np.random.default_rng(8)
    G = 25
    codes = np.repeat(np.arange(G), rng.integers(4, 12, size=G))
    n = len(codes)
    x = rng.normal(size=n) + 1.0  # not centred: the engine centres it
    X = np.column_stack([np.ones(n), x])
    u = rng.normal(size=(G, 2)) * [1.0, 0.6]
    y = 2.0 + 0.5 * x + u[codes, 0] + u[codes, 1] * x + rng.normal(size=n)
    p = 2
    Z = X
    theta, fmin, ok = BlockEngine(y, X, Z, codes, codes.max() + 1).fit(True)

    def dense(t):
        r, ldx, ldv, _, _ = _dense(y, X, Z, codes, theta_to_lambda(t, 2))
        return _criterion(r, ldx, ldv, n, p, True)

    assert ok and fmin == pytest.approx(dense(theta), rel=1e-10)
    assert theta[0] > 0.3 and theta[2] > 0.3  # an interior optimum
    for k in range(3):
        for d in (-1e-3, 1e-3):
            t = theta.copy()
            t[k] += d
            assert dense(t) > fmin
