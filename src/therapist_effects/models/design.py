"""Design matrices with R-style names, shared by every model engine.

Numeric covariates keep their column name; categorical (object, string, category, bool) covariates
are treatment-coded against their first level in sorted order and named ``<column><level>`` as R's
``model.matrix`` does (e.g. ``trial_idS01``, ``sexM``). The intercept is ``(Intercept)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..exceptions import ModelError

INTERCEPT = "(Intercept)"


@dataclass(frozen=True)
class Design:
    """Response vector, fixed-effects design matrix and column names."""

    y: np.ndarray
    X: np.ndarray
    names: list[str]


def is_categorical(s: pd.Series) -> bool:
    return not (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s))


def fixed_effects_matrix(
    df: pd.DataFrame, terms: Sequence[str], *, intercept: bool = True
) -> tuple[np.ndarray, list[str]]:
    """Build the fixed-effects matrix of ``terms`` (columns of ``df``), R-style coding and names."""
    cols: list[np.ndarray] = []
    names: list[str] = []
    n = len(df)
    if intercept:
        cols.append(np.ones(n))
        names.append(INTERCEPT)
    for term in terms:
        if term not in df.columns:
            raise ModelError(f"covariate {term!r} is not a column of the patient table")
        s = df[term]
        if is_categorical(s):
            levels = sorted(pd.unique(s.dropna().astype(str)))
            values = s.astype(str).to_numpy()
            for level in levels[1:] if intercept else levels:
                cols.append((values == level).astype(float))
                names.append(f"{term}{level}")
        else:
            cols.append(s.to_numpy(dtype=float))
            names.append(term)
    X = np.column_stack(cols) if cols else np.empty((n, 0))
    return X, names


def build_design(
    df: pd.DataFrame, outcome: str, terms: Sequence[str] = (), *, intercept: bool = True
) -> Design:
    """Response and fixed-effects design for ``outcome ~ terms`` on complete rows of ``df``.

    The caller is responsible for dropping incomplete rows first (so that they can be reported);
    this function refuses missing values rather than dropping them silently.
    """
    if outcome not in df.columns:
        raise ModelError(f"outcome {outcome!r} is not a column of the patient table")
    used = [outcome, *terms]
    missing = df[used].isna().any(axis=1)
    if missing.any():
        raise ModelError(
            f"{int(missing.sum())} rows have missing values in {used}; drop them before fitting"
        )
    X, names = fixed_effects_matrix(df, terms, intercept=intercept)
    y = df[outcome].to_numpy(dtype=float)
    if X.shape[1] and np.linalg.matrix_rank(X) < X.shape[1]:
        raise ModelError(f"fixed-effects design {names} is rank deficient")
    return Design(y=y, X=X, names=names)


def group_codes(labels: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes 0..G-1 (groups in sorted order of their labels) and the labels themselves."""
    codes, uniques = pd.factorize(pd.Series(labels).astype(str), sort=True)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)
