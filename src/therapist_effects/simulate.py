"""Simulate practice-based psychotherapy outcome data with known truth.

The generating model (per patient *i* of therapist *t* in service *s*, arm *a* = 0 control / 1 feedback)::

    baseline_i   ~ Normal(baseline_mean, baseline_sd), rounded and clipped to the instrument's range
    end_i*       = b0 + b_baseline * (baseline_i - baseline_mean) + b_feedback * a_i
                   + b_age * (age_i - 40) / 10 + b_female * female_i
                   + v_s + u_{t,a} + e_i
    v_s ~ N(0, service_var),  u_{t,a} ~ N(0, therapist_var[a]),  e_i ~ N(0, residual_var)

``end_i*`` is the latent end-of-treatment score on the instrument's scale. Session scores move from
the intake score towards ``end_i*`` along an exponential curve with measurement noise, and are rounded
and clipped to the instrument's range (floor and ceiling). Patients drop out with a per-session hazard
(``ending = "dropout"``; their last observed score is then earlier on the curve), sessions are missed
at random (no row for that occasion), caseloads are unbalanced (a gamma-Poisson mixture), and the
feedback arm is assigned per patient within therapist (as in the feedback trials, where therapists treat
patients in both arms) or per therapist (``arm_assignment="therapist"``).

The truth returned alongside the data is that of the latent linear model; the observed end score adds
rounding, the floor/ceiling and dropout, so estimates from the observed data match it approximately.
Use :func:`simulate_random_intercept` for data that follow a Gaussian random-intercept model exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd


@dataclass
class PracticeSimulation:
    """Settings of :func:`simulate_practice`. Variances are on the instrument's score scale."""

    n_services: int = 4
    therapists_per_service: int = 15
    mean_caseload: float = 25.0
    caseload_dispersion: float = 2.0  # gamma shape of the caseload mixture: smaller = more unbalanced
    min_caseload: int = 2
    instrument_min: float = 0.0
    instrument_max: float = 27.0
    baseline_mean: float = 16.0
    baseline_sd: float = 5.0
    b0: float = 8.0
    b_baseline: float = 0.55
    b_feedback: float = -0.9
    b_age: float = 0.2
    b_female: float = -0.3
    service_var: float = 0.3
    therapist_var: tuple[float, float] = (1.6, 0.8)  # (control, feedback)
    residual_var: float = 24.0
    feedback_share: float = 0.5
    arm_assignment: str = "patient"  # "patient": randomised within therapist; "therapist": per therapist
    mean_planned_sessions: float = 8.0
    max_sessions: int = 20
    dropout_hazard: float = 0.04
    missed_session_prob: float = 0.08
    measurement_sd: float = 1.5
    improvement_time: float = 3.0  # sessions for ~63% of the change
    start_date: str = "2024-01-08"
    seed: int = 20240601
    labels: dict = field(
        default_factory=lambda: {
            "patient": "patient_id",
            "therapist": "therapist_id",
            "service": "service",
            "arm": "feedback",
            "occasion": "session",
            "date": "session_date",
            "score": "phq9",
            "ending": "ending",
        }
    )

    def truth(self) -> dict:
        """The generating values, including the therapist ICC per arm (service variance counted in total)."""
        t0, t1 = self.therapist_var
        total0 = self.service_var + t0 + self.residual_var
        total1 = self.service_var + t1 + self.residual_var
        icc0, icc1 = t0 / total0, t1 / total1
        return {
            **{k: v for k, v in asdict(self).items() if k != "labels"},
            "icc_control": icc0,
            "icc_feedback": icc1,
            "icc_ratio": icc1 / icc0,
            "icc_reduction": 1.0 - icc1 / icc0,
        }


def _caseloads(rng: np.random.Generator, n: int, mean: float, shape: float, minimum: int) -> np.ndarray:
    lam = rng.gamma(shape, mean / shape, size=n)
    return np.maximum(rng.poisson(lam), minimum)


def simulate_practice(settings: PracticeSimulation | None = None, **overrides) -> tuple[pd.DataFrame, dict]:
    """Simulate a routine-outcome export in the session layout (one row per measured session).

    Returns ``(sessions, truth)``; ``truth`` is :meth:`PracticeSimulation.truth`. Deterministic given
    ``settings.seed``.
    """
    s = settings or PracticeSimulation()
    if overrides:
        s = PracticeSimulation(**{**asdict(s), **overrides})
    rng = np.random.default_rng(s.seed)
    lab = s.labels

    n_therapists = s.n_services * s.therapists_per_service
    service_of_therapist = np.repeat(np.arange(s.n_services), s.therapists_per_service)
    caseload = _caseloads(rng, n_therapists, s.mean_caseload, s.caseload_dispersion, s.min_caseload)
    therapist = np.repeat(np.arange(n_therapists), caseload)
    n = therapist.size
    service = service_of_therapist[therapist]

    if s.arm_assignment == "therapist":
        arm_of_therapist = (rng.random(n_therapists) < s.feedback_share).astype(int)
        arm = arm_of_therapist[therapist]
    elif s.arm_assignment == "patient":
        arm = (rng.random(n) < s.feedback_share).astype(int)
    else:
        raise ValueError("arm_assignment must be 'patient' or 'therapist'")

    v_service = rng.normal(0.0, np.sqrt(s.service_var), s.n_services)
    u = np.column_stack(
        [rng.normal(0.0, np.sqrt(var), n_therapists) for var in s.therapist_var]
    )  # therapist x arm
    age = np.clip(np.round(rng.normal(40, 13, n)), 18, 90)
    female = (rng.random(n) < 0.62).astype(int)
    lo, hi = s.instrument_min, s.instrument_max
    baseline = np.clip(np.round(rng.normal(s.baseline_mean, s.baseline_sd, n)), lo, hi)
    end_latent = (
        s.b0
        + s.b_baseline * (baseline - s.baseline_mean)
        + s.b_feedback * arm
        + s.b_age * (age - 40) / 10
        + s.b_female * female
        + v_service[service]
        + u[therapist, arm]
        + rng.normal(0.0, np.sqrt(s.residual_var), n)
    )

    planned = np.minimum(1 + rng.poisson(s.mean_planned_sessions - 1, n), s.max_sessions)
    planned = np.maximum(planned, 2)
    # Dropout: geometric number of sessions attended before leaving, counted from session 2.
    left_after = 1 + rng.geometric(s.dropout_hazard, n)
    dropped = left_after < planned
    attended = np.where(dropped, left_after, planned)
    start = pd.Timestamp(s.start_date) + pd.to_timedelta(rng.integers(0, 365, n), unit="D")

    rows = []
    therapist_ids = np.array([f"T{t:03d}" for t in range(n_therapists)])
    for i in range(n):
        k = np.arange(1, attended[i] + 1)
        # Share of the eventual change reached by session k (session 1 is the intake: share 0).
        share = (1 - np.exp(-(k - 1) / s.improvement_time)) / (1 - np.exp(-(planned[i] - 1) / s.improvement_time))
        latent = baseline[i] + (end_latent[i] - baseline[i]) * share
        score = latent + rng.normal(0.0, s.measurement_sd, k.size)
        score[0] = baseline[i]
        score = np.clip(np.round(score), lo, hi)
        keep = np.ones(k.size, bool)
        if k.size > 2:  # the intake and last attended sessions are always measured
            keep[1:-1] = rng.random(k.size - 2) >= s.missed_session_prob
        gap_days = 7 * (k - 1) + rng.integers(0, 3, k.size) * (k > 1)
        dates = start[i] + pd.to_timedelta(gap_days, unit="D")
        ending = "dropout" if dropped[i] else "completed"
        for j in np.flatnonzero(keep):
            rows.append(
                (
                    f"P{i:05d}",
                    therapist_ids[therapist[i]],
                    f"S{service[i] + 1}",
                    int(arm[i]),
                    int(k[j]),
                    dates[j].strftime("%Y-%m-%d"),
                    float(score[j]),
                    int(age[i]),
                    "F" if female[i] else "M",
                    ending,
                )
            )
    sessions = pd.DataFrame(
        rows,
        columns=[
            lab["patient"], lab["therapist"], lab["service"], lab["arm"], lab["occasion"],
            lab["date"], lab["score"], "age", "sex", lab["ending"],
        ],
    )
    return sessions, s.truth()


def inject_data_errors(sessions: pd.DataFrame, seed: int = 1, labels: dict | None = None) -> pd.DataFrame:
    """Add a handful of realistic export errors to a simulated session table, for the demo's rejects.

    One each of: an out-of-range score, a non-numeric score, a missing therapist ID, a duplicated
    session, an impossible (future) date, and a patient whose later sessions were recorded under a
    second therapist (resolved by the multi-therapist rule, not rejected).
    """
    lab = labels or PracticeSimulation().labels
    rng = np.random.default_rng(seed)
    df = sessions.copy()
    df[lab["score"]] = df[lab["score"]].astype(object)
    picks = rng.choice(len(df), size=5, replace=False)
    df.loc[df.index[picks[0]], lab["score"]] = 99.0
    df.loc[df.index[picks[1]], lab["score"]] = "n/a"
    df.loc[df.index[picks[2]], lab["therapist"]] = None
    df.loc[df.index[picks[3]], lab["date"]] = "2099-01-01"
    duplicate = df.iloc[[picks[4]]]
    # A patient with >= 4 sessions has the last one recorded under another therapist.
    counts = df.groupby(lab["patient"]).size()
    moved_patient = counts[counts >= 4].index[0]
    last = df.index[df[lab["patient"]] == moved_patient][-1]
    others = sorted(set(df[lab["therapist"]].dropna()) - {df.at[last, lab["therapist"]]})
    df.loc[last, lab["therapist"]] = others[0]
    out = pd.concat([df, duplicate], ignore_index=True)
    return out


def simulate_random_intercept(
    n_therapists: int,
    patients_per_therapist: int | np.ndarray,
    icc: float,
    *,
    total_var: float = 1.0,
    beta: tuple[float, ...] = (0.0, 0.5),
    seed: int = 0,
) -> pd.DataFrame:
    """Patient-level data from an exact Gaussian random-intercept model with known ICC.

    ``y = beta[0] + beta[1] * x + u_therapist + e`` with ``x ~ N(0, 1)``, ``var(u) = icc * total_var``
    and ``var(e) = (1 - icc) * total_var``. Columns: ``patient, therapist, x, y``.
    """
    rng = np.random.default_rng(seed)
    sizes = np.broadcast_to(np.asarray(patients_per_therapist), (n_therapists,))
    therapist = np.repeat(np.arange(n_therapists), sizes)
    n = therapist.size
    u = rng.normal(0.0, np.sqrt(icc * total_var), n_therapists)
    x = rng.normal(size=n)
    y = beta[0] + beta[1] * x + u[therapist] + rng.normal(0.0, np.sqrt((1 - icc) * total_var), n)
    return pd.DataFrame(
        {
            "patient": [f"P{i:07d}" for i in range(n)],
            "therapist": [f"T{t:05d}" for t in therapist],
            "x": x,
            "y": y,
        }
    )
