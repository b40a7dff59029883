"""The shared results interface (engine/results.py) and the model registry (engine/registry.py).

AIC / BIC of every engine against lme4 1.1-31: ``tests/reference/aic_bic.json`` written by
``tests/reference/aic_bic.R`` (``AIC(fit)``, ``BIC(fit)``, ``attr(logLik(fit), "df")``; REML fits
use the REML criterion, as lme4 does).
"""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest

from refdata import REFERENCE_DIR
from therapist_effects.arm import ArmVarianceModel
from therapist_effects.engine.registry import REGISTRY, lookup, model_class
from therapist_effects.engine.results import ModelResults
from therapist_effects.exceptions import ModelError
from therapist_effects.glmm import LogisticRandomInterceptModel
from therapist_effects.reml import NestedModel, RandomInterceptModel

REF = json.loads((REFERENCE_DIR / "aic_bic.json").read_text())
FB = pd.read_csv(REFERENCE_DIR / "therapy_feedback.csv")
TR = pd.read_csv(REFERENCE_DIR / "therapy_trials.csv")
COV = ["phq9_pre", "feedback"]


def _fits():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            # lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), REML = TRUE / FALSE)
            "ri_REML": RandomInterceptModel.from_frame(FB, "phq9_post", COV, therapist="therapist_id").fit(),
            "ri_ML": RandomInterceptModel.from_frame(FB, "phq9_post", COV, therapist="therapist_id",
                                                     method="ML").fit(),
            # lmer(phq9_post ~ phq9_pre + feedback + (1 | trial_id/therapist_id), REML = TRUE)
            "nested_REML": NestedModel.from_frame(TR, "phq9_post", COV, therapist="therapist_id",
                                                  cluster="trial_id").fit(),
            # lmer(... + (0 + control | therapist_id) + (0 + feedback | therapist_id), REML = TRUE)
            "arm_REML": ArmVarianceModel.from_frame(FB, "phq9_post", COV, therapist="therapist_id",
                                                    arm="feedback").fit(),
            # glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), binomial)  (Laplace)
            "logit_laplace": LogisticRandomInterceptModel.from_frame(FB, "recovered", COV, therapist="therapist_id",
                                                                     method="laplace").fit(),
        }


@pytest.fixture(scope="module")
def fits():
    return _fits()


@pytest.mark.parametrize("key", ["ri_REML", "ri_ML", "nested_REML", "arm_REML", "logit_laplace"])
def test_aic_bic_as_lme4(fits, key):
    res, ref = fits[key], REF[key]
    assert isinstance(res, ModelResults)
    assert res.df_model == ref["df"]
    assert res.nobs == ref["nobs"]
    assert res.llf == pytest.approx(ref["logLik"], rel=1e-6)
    assert res.aic == pytest.approx(ref["AIC"], rel=1e-6)
    assert res.bic == pytest.approx(ref["BIC"], rel=1e-6)


def test_contract_entries_carry_aic_bic(fits):
    for key in ("ri_REML", "nested_REML", "arm_REML"):
        c = fits[key].to_contract()
        assert c["aic"] == pytest.approx(REF[key]["AIC"], rel=1e-6)
        assert c["bic"] == pytest.approx(REF[key]["BIC"], rel=1e-6)


def test_registry_maps_every_type_to_its_class():
    assert model_class("random_intercept") is RandomInterceptModel
    assert model_class("nested") is NestedModel
    assert model_class("arm_variance") is ArmVarianceModel
    assert model_class("random_intercept", "binomial") is LogisticRandomInterceptModel
    assert model_class("random_slope").__name__ == "RandomSlopeModel"
    assert lookup("nested", engine="bayes") is REGISTRY["bayes"]
    with pytest.raises(ModelError, match="no engine"):
        lookup("growth_curve")


def test_one_bootstrap_seed_rule_and_failure_count():
    """engine.inference.parametric_bootstrap: seed=None is seed 0; refits that raise or do not
    converge are counted and NaN, and percentile intervals leave them out."""
    import numpy as np

    from therapist_effects.engine.inference import parametric_bootstrap

    def simulate(rng):
        return rng.normal(size=5)

    def refit(x):
        if x[0] > 1.0:
            raise np.linalg.LinAlgError("singular")
        return {"m": float(x.mean()), "converged": x[1] < 1.5, "flag": x[2] > 0}

    a = parametric_bootstrap(simulate, refit, 200, None, ["m"], flags=("flag",))
    b = parametric_bootstrap(simulate, refit, 200, 0, ["m"], flags=("flag",))
    pd.testing.assert_frame_equal(a.draws, b.draws)
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=5) for _ in range(200)]
    failed = sum(x[0] > 1.0 or x[1] >= 1.5 for x in xs)
    assert a.n_failed == failed > 0 and int(a.draws["m"].isna().sum()) == failed
    ok = [x.mean() for x in xs if not (x[0] > 1.0 or x[1] >= 1.5)]
    assert a.interval("m", 0.9) == pytest.approx(tuple(np.quantile(ok, [0.05, 0.95])))
