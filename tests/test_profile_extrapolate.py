"""The profile root search's signed-root mode (engine.inference.signed_root_limit,
profile_limit(extrapolate=True)): the same limits as the plain search on profiles with known roots,
in fewer evaluations, and the edge of the parameter space still found where the profile stays
below the cut-off."""

import math

import pytest

from therapist_effects.engine.inference import chi2_cut, profile_limit, signed_root_limit

Q95 = chi2_cut(0.95)


def test_signed_root_search_finds_the_known_roots_in_fewer_evaluations():
    quad = lambda b: ((b - 1.0) / 0.2) ** 2  # noqa: E731 - Wald-exact: roots 1 -+ 0.2 z
    z = math.sqrt(Q95)
    for d in (-1, 1):
        plain = profile_limit(quad, 1.0, Q95, d, step=0.1)
        fast = signed_root_limit(quad, 1.0, Q95, d, step=0.1, extrapolate=True)
        assert fast.status == plain.status == "root"
        assert fast.value == pytest.approx(1.0 + d * 0.2 * z, rel=1e-12)
        assert fast.evaluations < plain.evaluations
        wald = signed_root_limit(quad, 1.0, Q95, d, step=0.1, wald=0.2 * z, extrapolate=True)
        assert wald.value == pytest.approx(1.0 + d * 0.2 * z, rel=1e-12) and wald.evaluations <= fast.evaluations
    # a variance on the log scale (criterion undefined at 0): roots at g = 4 (upper) and 1/4 (lower)
    skew = lambda g: Q95 * (math.log(g) / math.log(4.0)) ** 2  # noqa: E731
    for d, root in ((1, 4.0), (-1, 0.25)):
        lim = signed_root_limit(skew, 1.0, Q95, d, lower=0.0, log_scale=True, step=0.1, edge_ok=False,
                                extrapolate=True)
        assert lim.status == "root" and lim.value == pytest.approx(root, rel=1e-10)


def test_signed_root_search_keeps_the_edge_and_the_far_root_from_zero():
    # below the cut-off down to the edge 0: the edge is the limit (evaluated once the line through
    # the estimate predicts the crossing past it)
    flat = lambda s: 0.5 * Q95 * (1.0 - s) ** 2  # noqa: E731
    lim = signed_root_limit(flat, 1.0, Q95, -1, lower=0.0, log_scale=True, step=0.1, extrapolate=True)
    assert lim.status == "edge" and lim.value == 0.0
    # crossing close to the edge: a root, not the edge
    near = lambda s: 1.2 * Q95 * (1.0 - s) ** 2  # noqa: E731
    lim = signed_root_limit(near, 1.0, Q95, -1, lower=0.0, log_scale=True, step=0.1, extrapolate=True)
    assert lim.status == "root" and lim.value == pytest.approx(1.0 - math.sqrt(1 / 1.2), rel=1e-10)
    # an estimate at 0 (a singular fit): the finite upper limit far away, as without extrapolation
    lim = signed_root_limit(lambda g: (g / 50.0) ** 2, 0.0, Q95, +1, lower=0.0, step=0.25, log_scale=True,
                            scale=1e-3, extrapolate=True)
    assert lim.status == "root" and lim.value == pytest.approx(50 * math.sqrt(Q95), rel=1e-10)
