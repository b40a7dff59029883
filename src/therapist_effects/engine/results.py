"""The interface every fitted therapist model shares (Gaussian engines, GLMM and Bayes).

:class:`ModelResults` gives each results class the same names and defaults for the quantities that
do not depend on the engine: ``llf`` (the maximised log-likelihood, lme4's ``logLik``: the REML
criterion for REML fits), ``df_model`` (lme4's ``attr(logLik(fit), "df")``: fixed effects plus
covariance parameters plus the residual scale where there is one), ``nobs``, ``aic`` and ``bic``
(lme4's ``AIC()``/``BIC()``, so REML fits use the REML criterion as lme4 does), the default
interval method and level, and the keys ``aic``/``bic`` of the ``estimates.json`` entry.
Engines without a maximised likelihood (posterior sampling) report ``None``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .inference import DEFAULT_LEVEL, DEFAULT_N_BOOT

__all__ = ["ModelResults", "ICC", "Summary", "icc_table", "per_arm_icc", "interval_frame", "ICC_COLUMNS", "CONF_INT_COLUMNS",
           "DEFAULT_INTERVAL", "DEFAULT_LEVEL", "DEFAULT_N_BOOT"]

#: the default interval method of every engine's ``conf_int``
DEFAULT_INTERVAL = "profile"


class ModelResults:
    """Mixin of every results class. Subclasses set ``loglik`` (or None) and implement
    :meth:`_n_params`; ``nobs`` is read from ``n_obs`` or ``n_patients``."""

    default_interval = DEFAULT_INTERVAL
    default_level = DEFAULT_LEVEL
    default_n_boot = DEFAULT_N_BOOT

    def _n_params(self) -> int | None:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @property
    def llf(self) -> float | None:
        ll = getattr(self, "loglik", None)
        return None if ll is None else float(ll)

    @property
    def nobs(self) -> int:
        n = getattr(self, "n_obs", None)
        return int(n if n is not None else self.n_patients)

    @property
    def df_model(self) -> int | None:
        return self._n_params()

    @property
    def aic(self) -> float | None:
        ll, k = self.llf, self.df_model
        if ll is None or k is None or not math.isfinite(ll):
            return None
        return -2.0 * ll + 2.0 * k

    @property
    def bic(self) -> float | None:
        ll, k = self.llf, self.df_model
        if ll is None or k is None or not math.isfinite(ll):
            return None
        return -2.0 * ll + math.log(self.nobs) * k

    def _set_fixed_effects(self, b: np.ndarray, cov: np.ndarray, names) -> pd.DataFrame:
        """Set ``fe_params``, ``vcov`` (lme4's ``vcov(fit)``) and ``bse`` from the fixed effects ``b``
        and their covariance; returns ``vcov``."""
        self.fe_params = pd.Series(b, index=names, name="estimate")
        self.vcov = pd.DataFrame(cov, index=names, columns=names)
        self.bse = pd.Series(np.sqrt(np.diag(cov)), index=names, name="se")
        return self.vcov

    def information_criteria(self) -> dict[str, float | None]:
        """``{"aic": ..., "bic": ...}`` for the model's ``estimates.json`` entry."""
        return {"aic": self.aic, "bic": self.bic}

    def fit_fields(self) -> dict:
        """The fit-quality keys of an ``estimates.json`` entry: ``loglik``, ``aic``, ``bic``,
        ``converged``, ``singular`` (plain floats / None / bools)."""
        def num(v):
            return None if v is None or not math.isfinite(float(v)) else float(v)

        return {"loglik": num(self.llf), "aic": num(self.aic), "bic": num(self.bic),
                "converged": bool(self.converged), "singular": bool(self.singular)}

    # -- the uniform interface: summary() and therapist_effects() -------------------------------
    def therapist_effects(self, level: float = DEFAULT_LEVEL, higher_is_better: bool | None = None
                          ) -> pd.DataFrame:  # pragma: no cover - every subclass overrides
        """One row per therapist (per therapist and arm in arm models): at least ``therapist``,
        ``caseload``, ``effect``, ``effect_se``, ``ci_low``, ``ci_high``, ``classification``."""
        raise NotImplementedError

    def _summary_title(self) -> str:
        return type(self).__name__

    def _summary_info(self) -> dict:
        info = {"method": getattr(self, "method", None), "patients": self.nobs,
                "therapists": getattr(self, "n_therapists", None)}
        if getattr(self, "n_clusters", None):
            info["clusters"] = self.n_clusters
        info.update({"log-likelihood": self.llf, "AIC": self.aic, "BIC": self.bic,
                     "converged": bool(self.converged), "singular": bool(self.singular)})
        return info

    def _summary_tables(self) -> dict:
        from scipy import stats

        fe, se = self.fe_params, self.bse.reindex(self.fe_params.index)
        z = stats.norm.ppf(0.5 + DEFAULT_LEVEL / 2)
        fixed = pd.DataFrame({"estimate": fe, "se": se, "z": fe / se,
                              "[0.025": fe - z * se, "0.975]": fe + z * se})
        vc = pd.DataFrame({"variance": pd.Series(self.vcomp, dtype=float)})
        vc["sd"] = np.sqrt(vc["variance"].clip(lower=0.0))
        return {"Fixed effects (Wald intervals)": fixed, "Variance components": vc,
                "ICC": self.icc().table[["estimate"]]}

    def _summary_notes(self) -> list:
        return list(getattr(self, "warnings", None) or getattr(self, "warnings_list", None) or [])

    def summary(self) -> Summary:
        """Printable summary (a :class:`Summary`, which is the text itself): model facts, fixed
        effects, variance components, ICC(s) and the warnings raised so far."""
        return Summary(self._summary_title(), self._summary_info(), self._summary_tables(),
                       self._summary_notes())


# -- the common return types --------------------------------------------------------------------

#: columns of every ``icc()`` table (``ci_*`` NaN and ``ci_method`` None when no interval was asked for)
ICC_COLUMNS = ["estimate", "ci_low", "ci_high", "ci_method"]
#: columns of every ``conf_int()`` frame
CONF_INT_COLUMNS = ["lower", "upper"]


class ICC(float):
    """What every results class's ``icc()`` returns: the model's ICC(s) as one table, usable as a
    number where the model has one therapist ICC.

    ``table``: one row per ICC the model defines, columns :data:`ICC_COLUMNS` (engines may append
    columns of their own, e.g. the posterior ``mean``/``median``). Row names: ``icc`` (the therapist
    ICC), ``icc_cluster`` (nested), ``icc[<arm>]`` (one per arm in arm-variance and random-slope
    models). The float value is the ``icc`` row's estimate; models without a single therapist ICC
    (one per arm) have the value NaN: read ``table`` or ``icc["icc[<arm>]"]``.
    ``icc[name]`` is the estimate of row ``name``; ``icc.loc`` is ``icc.table.loc``.
    """

    table: pd.DataFrame

    def __new__(cls, table: pd.DataFrame) -> ICC:
        t = table.copy()
        for c in ICC_COLUMNS:
            if c not in t.columns:
                t[c] = None if c == "ci_method" else np.nan
        t = t[ICC_COLUMNS + [c for c in t.columns if c not in ICC_COLUMNS]]
        value = float(t.loc["icc", "estimate"]) if "icc" in t.index else float("nan")
        obj = super().__new__(cls, value)
        obj.table = t
        return obj

    def __reduce__(self):
        return (ICC, (self.table,))

    def __getitem__(self, name: str) -> float:
        return float(self.table.loc[name, "estimate"])

    @property
    def loc(self):
        return self.table.loc

    @property
    def names(self) -> list[str]:
        return [str(i) for i in self.table.index]

    def interval(self, name: str = "icc") -> tuple[float, float]:
        """``(ci_low, ci_high)`` of row ``name`` (NaN when ``icc()`` was called without a level)."""
        return float(self.table.loc[name, "ci_low"]), float(self.table.loc[name, "ci_high"])

    def __repr__(self) -> str:
        return f"ICC({float(self)!r})\n{self.table.to_string()}"


def icc_table(estimates: dict, intervals: dict | None = None, method: str | None = None,
              extra: dict | None = None) -> ICC:
    """An :class:`ICC` from ``{name: estimate}`` and (optional) ``{name: (lo, hi)}``."""
    intervals = intervals or {}
    rows = {}
    for name, est in estimates.items():
        lo, hi = intervals.get(name, (np.nan, np.nan))
        rows[name] = {"estimate": float(est), "ci_low": float(lo), "ci_high": float(hi),
                      "ci_method": method if name in intervals else None,
                      **((extra or {}).get(name, {}))}
    return ICC(pd.DataFrame.from_dict(rows, orient="index"))


def per_arm_icc(levels, estimates, by_arm: pd.DataFrame | None = None, method: str | None = None) -> ICC:
    """The :class:`ICC` of an arm model: rows ``icc[<arm>]`` with a ``role`` column (control for the
    first arm, feedback for the second); ``by_arm``: the model's ``icc_by_arm`` frame (index = arm
    level, columns ``ci_low``/``ci_high``) when intervals were asked for."""
    names = [f"icc[{v}]" for v in levels]
    extra = {n: {"role": "control" if a == 0 else "feedback"} for a, n in enumerate(names)}
    est = {n: float(e) for n, e in zip(names, estimates)}
    if by_arm is None:
        return icc_table(est, extra=extra)
    iv = {n: (by_arm.loc[v, "ci_low"], by_arm.loc[v, "ci_high"]) for n, v in zip(names, levels)}
    return icc_table(est, iv, method, extra)


def interval_frame(rows: dict) -> pd.DataFrame:
    """The ``conf_int()`` frame: ``{name: (lower, upper)}`` -> columns :data:`CONF_INT_COLUMNS`."""
    return pd.DataFrame.from_dict({k: (float(a), float(b)) for k, (a, b) in rows.items()},
                                  orient="index", columns=CONF_INT_COLUMNS)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "nan" if not math.isfinite(float(v)) else f"{float(v):.6g}"
    return str(v)


class Summary(str):
    """What every results class's ``summary()`` returns: printable text (it *is* the text, so
    ``print(res.summary())`` and ``"ICC" in res.summary()`` work), built from named parts as
    statsmodels' ``Summary`` is: ``title``, ``info`` (model facts, key -> value), ``tables``
    (title -> DataFrame: fixed effects, variance components, ICC, ...) and ``notes`` (warnings).
    ``as_text()`` and ``as_html()`` render it."""

    title: str
    info: dict
    tables: dict
    notes: list

    def __new__(cls, title: str, info: dict, tables: dict, notes=()) -> Summary:
        width = 78
        lines = [title, "=" * width]
        items = [f"{k + ':':<18}{_fmt(v):>20}" for k, v in info.items()]
        for i in range(0, len(items), 2):
            lines.append("   ".join(items[i:i + 2]).rstrip())
        for name, df in tables.items():
            lines += ["-" * width, name]
            body = df.map(_fmt) if hasattr(df, "map") else df.applymap(_fmt)
            lines.append(body.to_string())
        notes = [str(n) for n in notes]
        if notes:
            lines += ["-" * width, "Notes:"] + [f"  [{i + 1}] {n}" for i, n in enumerate(notes)]
        lines.append("=" * width)
        obj = super().__new__(cls, "\n".join(lines))
        obj.title, obj.info, obj.tables, obj.notes = title, dict(info), dict(tables), notes
        return obj

    def __reduce__(self):
        return (Summary, (self.title, self.info, self.tables, self.notes))

    def as_text(self) -> str:
        return str.__str__(self)

    def as_html(self) -> str:
        import html

        out = [f"<h3>{html.escape(self.title)}</h3>", "<table>"]
        out += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in self.info.items()]
        out.append("</table>")
        for name, df in self.tables.items():
            out += [f"<h4>{html.escape(name)}</h4>", df.to_html()]
        if self.notes:
            out.append("<ol>" + "".join(f"<li>{html.escape(n)}</li>" for n in self.notes) + "</ol>")
        return "\n".join(out)

    def _repr_html_(self) -> str:
        return self.as_html()
