"""Tests of the grid sampler of the Bayesian engine (``therapist_effects.models.bayes_grid``).

Independent truths:
- the collapsed likelihood (fixed and therapist effects integrated out) against the multivariate normal
  density ``y ~ N(X m, V + X S X')`` built densely with numpy / scipy;
- the SD priors' densities against PyMC's ``logp`` of the same distributions;
- the posterior quantiles against a brute-force quadrature of the dense density on a fixed, fine grid in
  the natural coordinates (sigma, sd), and against long NUTS runs (nutpie) of the marginal PyMC model,
  on an ordinary and on a near-boundary (true therapist SD 0, singular REML fit) data set, each
  difference judged against its Monte Carlo standard error (batch means).

The NUTS comparison compiles one nutpie model (~30 s) and refits it to the second data set.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import multivariate_normal

from therapist_effects.exceptions import ConfigError, SamplerWarning, SingularFitWarning
from therapist_effects.models import bayes, bayes_grid
from therapist_effects.models.bayes import BayesConfig, BayesModel, fit_bayes
from therapist_effects.models.bayes_grid import log_sd_prior
from therapist_effects.models.reml import RandomInterceptModel


def _practice(seed: int, therapists: int, caseload: int, sd_therapist: float, sd_site: float = 0.3,
              sites: int = 4) -> pd.DataFrame:
    """y = 1 + 0.5 x + v + u + e, e ~ N(0, 1), u ~ N(0, sd_therapist), v ~ N(0, sd_site) per site; uneven
    caseloads; two arms."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(max(caseload // 2, 2), 2 * caseload, therapists)
    therapist = np.repeat(np.arange(therapists), sizes)
    n = therapist.size
    u = rng.normal(0.0, sd_therapist, therapists)
    site = therapist % sites
    v = rng.normal(0.0, sd_site, sites)
    x = rng.normal(size=n)
    arm = (therapist % 2).astype(int)
    y = 1.0 + 0.5 * x + v[site] + u[therapist] + rng.normal(size=n)
    return pd.DataFrame({"therapist": [f"T{t:03d}" for t in therapist], "site": [f"S{s}" for s in site], "x": x,
                         "arm": arm, "y": y})


def _prep(df: pd.DataFrame, model_type: str):
    arm = "arm" if model_type == "arm_variance" else None
    cluster = "site" if model_type == "nested" else None
    return bayes._prepare(model_type, df, "y", ["x"], family="gaussian", therapist="therapist", cluster=cluster,
                          arm=arm, feedback_level=None)


def _dense_log_marginal(prep, post, sigma: float, sd: np.ndarray) -> float:
    """log N(ys | Xs m, V + Xs S Xs') with V built patient by patient (standardised scale); a nested model's
    last SD is the cluster's."""
    same = prep.block[:, None] == prep.block[None, :]
    sd = np.asarray(sd)
    sd_patient = sd[prep.arm_of_block[prep.block]]
    V = sigma**2 * np.eye(prep.n) + same * np.outer(sd_patient, sd_patient)
    if prep.model_type == "nested":
        cl = prep.cluster_of_block[prep.block]
        V += sd[-1] ** 2 * (cl[:, None] == cl[None, :])
    cov = V + prep.Xs @ np.diag(1.0 / post.prec) @ prep.Xs.T
    return float(multivariate_normal(prep.Xs @ post.m, cov).logpdf(prep.ys))


# --------------------------------------------------------------------------------------------
# the collapsed likelihood and the priors


@pytest.mark.parametrize("model_type", ["random_intercept", "arm_variance", "nested"])
def test_collapsed_likelihood_equals_dense_multivariate_normal(model_type):
    df = _practice(seed=3, therapists=12, caseload=6, sd_therapist=0.5)
    prep = _prep(df, model_type)
    post = bayes.grid_posterior(prep, bayes.resolve_priors(prep, None))
    rng = np.random.default_rng(4)
    for _ in range(4):
        sigma = rng.uniform(0.3, 2.0)
        sd = rng.uniform(0.0, 1.5, post.n_sd)
        got = post.log_marginal(np.array([sigma]), sd[None, :])[0]
        assert got == pytest.approx(_dense_log_marginal(prep, post, sigma, sd), rel=1e-10)
    # sd = 0 exactly (the boundary): the patients are independent given the fixed effects
    zero = np.zeros(post.n_sd)
    assert post.log_marginal(np.array([0.8]), zero[None, :])[0] == pytest.approx(
        _dense_log_marginal(prep, post, 0.8, zero), rel=1e-10)


def test_conditional_fixed_effects_are_the_gls_posterior():
    """b | sigma, sd, y ~ N(P^-1 r, P^-1), P = X'V^-1 X + S^-1, r = X'V^-1 y + S^-1 m (V dense)."""
    df = _practice(seed=5, therapists=10, caseload=5, sd_therapist=0.7)
    prep = _prep(df, "random_intercept")
    post = bayes.grid_posterior(prep, bayes.resolve_priors(prep, None))
    sigma, sd = 0.9, 0.6
    same = prep.block[:, None] == prep.block[None, :]
    Vinv = np.linalg.inv(sigma**2 * np.eye(prep.n) + sd**2 * same)
    P = prep.Xs.T @ Vinv @ prep.Xs + np.diag(post.prec)
    r = prep.Xs.T @ Vinv @ prep.ys + post.prec * post.m
    _, P_grid, r_grid, _ = post.normal_equations(np.array([sigma]), np.array([[sd]]))
    np.testing.assert_allclose(P_grid[0], P, rtol=1e-10)
    np.testing.assert_allclose(r_grid[0], r, rtol=1e-10)


@pytest.mark.parametrize("spec, pm_dist", [
    ({"dist": "halfnormal", "sigma": 0.7}, ("HalfNormal", {"sigma": 0.7})),
    ({"dist": "halfstudentt", "nu": 3.0, "sigma": 1.3}, ("HalfStudentT", {"nu": 3.0, "sigma": 1.3})),
    ({"dist": "halfcauchy", "beta": 0.4}, ("HalfCauchy", {"beta": 0.4})),
    ({"dist": "exponential", "lam": 2.5}, ("Exponential", {"lam": 2.5})),
])
def test_sd_prior_densities_equal_pymc(spec, pm_dist):
    import pymc as pm

    x = np.array([0.0, 0.01, 0.3, 1.0, 4.0])
    expected = pm.logp(getattr(pm, pm_dist[0]).dist(**pm_dist[1]), x).eval()
    # atol: PyTensor's gammaln (in HalfStudentT's constant) differs from SciPy's by 2e-8
    np.testing.assert_allclose(log_sd_prior(spec, x), expected, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------------
# the posterior


def _quantile_se(draws: np.ndarray, q: float, batches: int = 20) -> float:
    """Monte Carlo standard error of a quantile by batch means (contiguous batches: valid for MCMC)."""
    parts = np.array_split(np.asarray(draws), batches)
    return float(np.std([np.quantile(p, q) for p in parts], ddof=1) / math.sqrt(batches))


def _assert_same_quantiles(a: dict, b: dict, label: str) -> None:
    for name in a:
        for q in (0.05, 0.25, 0.5, 0.75, 0.95):
            diff = np.quantile(a[name], q) - np.quantile(b[name], q)
            se = math.hypot(_quantile_se(a[name], q), _quantile_se(b[name], q))
            assert abs(diff) < 4.5 * se + 1e-4 * np.std(b[name]), (label, name, q, diff, se)


def _draws(res) -> dict:
    post = res.idata.posterior
    out = {"sd_therapist": post["sd_therapist_std"].values.ravel(), "sigma": post["sigma_std"].values.ravel(),
           "icc": post["icc"].values.ravel()}
    for j, name in enumerate(res._prep.names):
        out[name] = post["fixed"].values[..., j].ravel()
    return out


ORDINARY = dict(seed=11, therapists=20, caseload=8, sd_therapist=0.5)
NEAR_BOUNDARY = dict(seed=13, therapists=20, caseload=8, sd_therapist=0.0, sd_site=0.0)


@pytest.fixture(scope="module")
def grid_fits():
    cfg = BayesConfig(chains=4, draws=5000, seed=3, sampler="grid")
    return {k: fit_bayes("random_intercept", _practice(**v), "y", ["x"], config=cfg)
            for k, v in (("ordinary", ORDINARY), ("near_boundary", NEAR_BOUNDARY))}


def test_grid_reaches_the_boundary_when_the_data_say_so(grid_fits):
    df = _practice(**NEAR_BOUNDARY)
    with pytest.warns(SingularFitWarning):  # REML puts the therapist SD at 0
        assert RandomInterceptModel.from_frame(df, "y", ["x"]).fit().singular
    near = grid_fits["near_boundary"]
    prep = near._prep
    grid = bayes.grid_posterior(prep, near.priors).build()
    assert grid.edges[1][0] == 0.0  # the therapist-SD axis starts exactly at sd = 0
    assert grid.edge_gap >= bayes_grid.EDGE_DROP
    sd = near.idata.posterior["sd_therapist_std"].values
    assert sd.min() < 0.01 * np.median(sd) and not near.failed
    ordinary = grid_fits["ordinary"]
    assert ordinary.idata.posterior.attrs["grid_edge_drop"] >= bayes_grid.EDGE_DROP


def _assert_quantiles_match_quadrature(draws: dict, logp: np.ndarray, s_edges: np.ndarray, t_edges: np.ndarray,
                                       cells: float) -> None:
    """Quantiles of the sigma and sd draws against the CDFs of ``logp`` (log density on the cells of
    ``s_edges`` x ``t_edges``), within 4.5 Monte Carlo SEs plus ``cells`` cell widths."""
    dens = np.exp(logp - logp.max())
    for name, marg, edges in (("sigma", dens.sum(axis=1), s_edges), ("sd_therapist", dens.sum(axis=0), t_edges)):
        cdf = np.concatenate([[0.0], np.cumsum(marg) / marg.sum()])
        for q in (0.05, 0.5, 0.95):
            exact = np.interp(q, cdf, edges)
            got = np.quantile(draws[name], q)
            se = _quantile_se(draws[name], q)
            assert abs(got - exact) < 4.5 * se + cells * (edges[1] - edges[0]), (name, q, got, exact, se)


@pytest.mark.parametrize("data", [dict(seed=21, therapists=10, caseload=5, sd_therapist=0.6, sd_site=0.0),
                                  dict(seed=22, therapists=10, caseload=5, sd_therapist=0.0, sd_site=0.0)])
def test_grid_posterior_equals_brute_force_quadrature(data):
    """Quantiles of sigma and sd against the CDF of the dense density integrated on a fixed 120 x 120 grid
    in (sigma, sd) (sd from 0), with the fixed effects integrated out by the dense formula."""
    fit = fit_bayes("random_intercept", _practice(**data), "y", ["x"],
                    config=BayesConfig(chains=4, draws=5000, seed=8, sampler="grid"))
    prep = fit._prep
    post = bayes.grid_posterior(prep, fit.priors)
    draws = _draws(fit)
    cells = 120
    s_edges = np.linspace(0.5 * draws["sigma"].min(), 1.5 * draws["sigma"].max(), cells + 1)
    t_edges = np.linspace(0.0, 1.5 * draws["sd_therapist"].max(), cells + 1)
    sm, tm = 0.5 * (s_edges[1:] + s_edges[:-1]), 0.5 * (t_edges[1:] + t_edges[:-1])
    same = prep.block[:, None] == prep.block[None, :]
    XSX = prep.Xs @ np.diag(1.0 / post.prec) @ prep.Xs.T
    logp = np.empty((cells, cells))
    for i, s in enumerate(sm):
        for j, t in enumerate(tm):
            cov = s**2 * np.eye(prep.n) + t**2 * same + XSX
            logp[i, j] = multivariate_normal(prep.Xs @ post.m, cov).logpdf(prep.ys)
    logp += log_sd_prior(post.sigma_prior, sm)[:, None] + log_sd_prior(post.sd_priors[0], tm)[None, :]
    _assert_quantiles_match_quadrature(draws, logp, s_edges, t_edges, cells=0.25)


def test_flat_density_at_the_boundary_is_gridded_correctly():
    """Regression (found by the SBC test): a mode next to sd = 0 where the density is flat made the
    finite-difference curvature noise and the grid's scale absurd (ICC coverage 0.82). Data set 1 of
    test_bayes_sbc (true ICC 0.0002); the grid's quantiles against quadrature of the collapsed density
    (checked against the dense one above) on a fixed 400 x 400 grid in (sigma, sd)."""
    from test_bayes_sbc import PRIORS, SEED, simulate_from_prior

    rng = np.random.default_rng(SEED)
    df = [simulate_from_prior(rng) for _ in range(2)][1][0]
    fit = fit_bayes("random_intercept", df, "y", ["x"],
                    config=BayesConfig(chains=4, draws=5000, seed=1, sampler="grid", priors=PRIORS))
    post = bayes.grid_posterior(fit._prep, fit.priors)
    draws = _draws(fit)
    s_edges = np.linspace(0.8 * draws["sigma"].min(), 1.2 * draws["sigma"].max(), 401)
    t_edges = np.linspace(0.0, 1.5 * draws["sd_therapist"].max(), 401)
    sm, tm = 0.5 * (s_edges[1:] + s_edges[:-1]), 0.5 * (t_edges[1:] + t_edges[:-1])
    S, T = (a.ravel() for a in np.meshgrid(sm, tm, indexing="ij"))
    logp = (post.log_marginal(S, T[:, None]) + post.log_prior(S, T[:, None])).reshape(400, 400)
    _assert_quantiles_match_quadrature(draws, logp, s_edges, t_edges, cells=0.5)


@pytest.fixture(scope="module")
def nuts_fits():
    cfg = BayesConfig(chains=4, draws=5000, tune=1000, seed=5, sampler="nutpie", parameterization="marginal",
                      target_accept=0.95)
    model = BayesModel("random_intercept", _practice(**ORDINARY), "y", ["x"], config=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)
        return {"ordinary": model.fit(), "near_boundary": model.fit(_practice(**NEAR_BOUNDARY))}


@pytest.mark.parametrize("key", ["ordinary", "near_boundary"])
def test_grid_posterior_agrees_with_long_nuts_runs(grid_fits, nuts_fits, key):
    grid, nuts = grid_fits[key], nuts_fits[key]
    assert nuts.diagnostics["max_rhat"] < 1.01
    _assert_same_quantiles(_draws(grid), _draws(nuts), key)
    eg, en = grid.therapist_table(), nuts.therapist_table()
    assert np.max(np.abs(eg["effect_mean"] - en["effect_mean"])) < 0.05
    assert np.max(np.abs(eg["p_top_quartile"] - en["p_top_quartile"])) < 0.05


# --------------------------------------------------------------------------------------------
# reproducibility, choice of sampler, loud failure


def test_same_seed_gives_identical_draws_and_another_seed_different_ones():
    df = _practice(**ORDINARY)
    cfg = BayesConfig(chains=2, draws=500, seed=9, sampler="grid")
    a = fit_bayes("arm_variance", df, "y", ["x"], arm="arm", config=cfg)
    b = fit_bayes("arm_variance", df, "y", ["x"], arm="arm", config=cfg)
    c = fit_bayes("arm_variance", df, "y", ["x"], arm="arm", config=replace(cfg, seed=10))
    for v in ("beta_std", "sigma_std", "sd_therapist_std", "therapist_effect"):
        np.testing.assert_array_equal(a.idata.posterior[v].values, b.idata.posterior[v].values)
    assert not np.array_equal(a.idata.posterior["sigma_std"].values, c.idata.posterior["sigma_std"].values)
    assert a.idata.posterior["sd_therapist_std"].dims == ("chain", "draw", "arm")
    assert a.sampler == "grid" and a.diagnostics["parameterization"] == "marginal"
    assert a.to_contract()["sampler"] == "grid" and not a.idata.sample_stats["diverging"].values.any()


def test_auto_picks_the_grid_only_where_it_applies():
    assert BayesConfig().resolved_sampler(grid_applies=True) == "grid"
    assert BayesConfig().resolved_sampler(grid_applies=False) in ("nutpie", "pymc")
    assert BayesConfig(sampler="nutpie").resolved_sampler(grid_applies=True) == "nutpie"
    with pytest.raises(ConfigError, match="'grid' covers"):
        BayesConfig(sampler="grid").resolved_sampler(grid_applies=False)
    df = _practice(**ORDINARY)
    with pytest.raises(ConfigError, match="'grid' covers"):
        BayesModel("random_intercept", df, "y", ["x"],
                   config=BayesConfig(sampler="grid", parameterization="noncentred"))
    with pytest.raises(ConfigError, match="expected one of"):
        BayesConfig(sampler="gibbs").resolved_sampler()
    m = BayesModel("random_intercept", df, "y", ["x"])
    assert m.sampler == "grid" and m.model is None and m.compile_seconds == 0.0


def test_refit_to_new_data_and_priors(grid_fits):
    df = _practice(**ORDINARY)
    m = BayesModel("random_intercept", df, "y", ["x"], config=BayesConfig(chains=2, draws=500, sampler="grid"))
    tight = BayesConfig(chains=2, draws=500, sampler="grid",
                        priors={"sigma_therapist": {"dist": "halfnormal", "sigma": 0.01}})
    refit = m.fit(config=tight)
    assert refit.priors["sigma_therapist"] == {"dist": "halfnormal", "sigma": 0.01}
    assert np.median(refit.idata.posterior["sd_therapist_std"].values) * refit._prep.sy < 0.02
    other = m.fit(_practice(**{**NEAR_BOUNDARY, "seed": 15}))
    assert other._prep.n != m.prep.n and not other.failed


def test_a_grid_that_cuts_the_tails_fails_loudly(monkeypatch):
    monkeypatch.setattr(bayes_grid, "EDGE_DROP", 2.0)  # a grid box far too narrow
    with pytest.warns(SamplerWarning, match="grid"):
        res = fit_bayes("random_intercept", _practice(**ORDINARY), "y", ["x"],
                        config=BayesConfig(chains=2, draws=500, sampler="grid"))
    assert res.failed and "tails may be cut" in res.advice


@pytest.mark.parametrize("higher_is_better", [None, False])
def test_therapist_table_equals_direct_computation(higher_is_better):
    """The table's one-sort summaries equal numpy's median / quantile / std and ArviZ's HDI of the draws,
    and the ranks scipy's rankdata within each arm."""
    import arviz as az
    from scipy.stats import rankdata

    res = fit_bayes("arm_variance", _practice(**ORDINARY), "y", ["x"], arm="arm",
                    config=BayesConfig(chains=2, draws=300, seed=4, sampler="grid"))
    t = res.therapist_table(0.9, higher_is_better=higher_is_better)
    eff = res.idata.posterior["therapist_effect"].values.reshape(600, -1)
    np.testing.assert_array_equal(t["effect_median"], np.median(eff, axis=0))
    np.testing.assert_allclose(t["effect_se"], eff.std(axis=0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(t["effect_mean"], eff.mean(axis=0), rtol=1e-12)
    hdi = np.array([az.hdi(eff[:, j], hdi_prob=0.9) for j in range(eff.shape[1])])
    np.testing.assert_array_equal(t[["effect_hdi_low", "effect_hdi_high"]].to_numpy(), hdi)
    sign = -1.0 if higher_is_better is False else 1.0
    arm = res._prep.arm_of_block
    ranks = np.empty_like(eff)
    for a in np.unique(arm):
        ranks[:, arm == a] = rankdata(-sign * eff[:, arm == a], axis=1)
    np.testing.assert_array_equal(t["rank_median"], np.median(ranks, axis=0))
    np.testing.assert_array_equal(t["rank_low"], np.quantile(ranks, 0.05, axis=0, method="lower"))
    np.testing.assert_array_equal(t["rank_high"], np.quantile(ranks, 0.95, axis=0, method="higher"))
    k = np.bincount(arm)[arm]
    np.testing.assert_allclose(t["p_top_quartile"], (ranks <= k / 4).mean(axis=0))
    np.testing.assert_allclose(t["p_bottom_quartile"], (ranks > k - k / 4).mean(axis=0))


@pytest.mark.slow
def test_nested_grid_posterior_agrees_with_long_nuts_run():
    """Slow (~2-3 min: a non-centred nested nutpie model compiles). Six sites: a wide, skewed posterior of
    the cluster SD; the cluster and therapist effects' posterior means and SDs agree too."""
    df = _practice(seed=31, therapists=24, caseload=8, sd_therapist=0.4, sd_site=0.5, sites=6)
    grid = fit_bayes("nested", df, "y", ["x"], cluster="site", config=BayesConfig(chains=4, draws=5000, seed=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)
        nuts = fit_bayes("nested", df, "y", ["x"], cluster="site", config=BayesConfig(
            chains=4, draws=5000, tune=1500, seed=2, sampler="nutpie", target_accept=0.99))
    assert grid.sampler == "grid" and nuts.diagnostics["max_rhat"] < 1.01
    a, b = _draws(grid), _draws(nuts)
    for d, res in ((a, grid), (b, nuts)):
        d["sd_cluster"] = res.idata.posterior["sd_cluster_std"].values.ravel()
        d["icc_cluster"] = res.idata.posterior["icc_cluster"].values.ravel()
    _assert_same_quantiles(a, b, "nested")
    for v in ("cluster_effect", "therapist_effect"):
        eg = grid.idata.posterior[v].values.reshape(20000, -1)
        en = nuts.idata.posterior[v].values.reshape(20000, -1)
        assert np.max(np.abs(eg.mean(axis=0) - en.mean(axis=0))) < 0.1 * eg.std(axis=0).mean(), v
        assert np.max(np.abs(eg.std(axis=0) - en.std(axis=0))) < 0.1 * eg.std(axis=0).mean(), v


@pytest.mark.slow
def test_arm_variance_grid_posterior_agrees_with_long_nuts_run():
    """Slow (~1-2 min: a marginal arm_variance nutpie model compiles). 3-D grid (residual SD, one
    therapist SD per arm): SDs, per-arm ICCs, their ratio and the fixed effects against NUTS."""
    df = _practice(seed=41, therapists=30, caseload=8, sd_therapist=0.5)
    grid = fit_bayes("arm_variance", df, "y", ["x"], arm="arm", config=BayesConfig(chains=4, draws=5000, seed=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)
        nuts = fit_bayes("arm_variance", df, "y", ["x"], arm="arm", config=BayesConfig(
            chains=4, draws=5000, tune=1000, seed=2, sampler="nutpie", parameterization="marginal", target_accept=0.95))
    assert grid.sampler == "grid" and nuts.diagnostics["max_rhat"] < 1.01

    def draws(res) -> dict:
        post = res.idata.posterior
        out = {"sigma": post["sigma_std"].values.ravel(), "icc_ratio": post["icc_ratio"].values.ravel()}
        for i in range(2):
            out[f"sd[{i}]"] = post["sd_therapist_std"].values[..., i].ravel()
            out[f"icc[{i}]"] = post["icc_arm"].values[..., i].ravel()
        for j, name in enumerate(res._prep.names):
            out[name] = post["fixed"].values[..., j].ravel()
        return out

    _assert_same_quantiles(draws(grid), draws(nuts), "arm_variance")
    p_grid, p_nuts = (r.to_contract()["p_icc_feedback_lt_control"] for r in (grid, nuts))
    assert abs(p_grid - p_nuts) < 0.03
