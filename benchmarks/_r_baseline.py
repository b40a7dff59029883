"""Optional R baseline of the benchmarks: time lme4's ``lmer`` / ``glmer`` (and
``confint(method = "profile")``) on the benchmark's own data, written to a temporary CSV.

Used by ``bench_reml.py`` and ``bench_glmm.py`` (a helper, not a benchmark: ``.ci/run`` skips files
whose name starts with ``_``). Without ``Rscript`` or without the R package lme4 (Debian:
``r-cran-lme4``) :func:`r_unavailable` says why, and the benchmarks print that and leave the R
columns out. Times are R's ``proc.time()`` elapsed seconds around the call only (reading the CSV
is not timed); the estimates come back so that the benchmarks can also show that both found the
same optimum.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

_PRELUDE = r"""
suppressPackageStartupMessages(library(lme4))
d <- read.csv(commandArgs(trailingOnly = TRUE)[1])
d$t <- factor(d$t)
el <- function() proc.time()[["elapsed"]]
out <- function(k, v) cat(sprintf("%s=%.12g\n", k, v))
"""

_LMER = r"""
t0 <- el(); fit <- lmer(y ~ x + (1 | t), d, REML = TRUE); out("fit_s", el() - t0)
b <- fixef(fit); vc <- as.data.frame(VarCorr(fit))
out("b0", b[[1]]); out("b1", b[[2]]); out("var_t", vc$vcov[1]); out("var_e", vc$vcov[2])
out("singular", isSingular(fit))
if (PROFILE) {
  t0 <- el(); ci <- confint(fit, method = "profile", oldNames = FALSE); out("confint_s", el() - t0)
  out("sd_t_lo", ci[1, 1]); out("sd_t_hi", ci[1, 2])
}
"""

_GLMER = r"""
X <- as.matrix(d[, grep("^x", names(d))])
for (q in c(1, NAGQ)) {
  t0 <- el()
  fit <- glmer(y ~ 0 + X + (1 | t), d, family = binomial, nAGQ = q)
  out(sprintf("fit_s_agq%d", q), el() - t0)
  out(sprintf("var_t_agq%d", q), as.data.frame(VarCorr(fit))$vcov[1])
  out(sprintf("loglik_agq%d", q), as.numeric(logLik(fit)))
}
"""


@functools.lru_cache(maxsize=1)
def r_unavailable() -> str | None:
    """None when Rscript with lme4 can run, else the reason (one line)."""
    exe = shutil.which("Rscript")
    if exe is None:
        return "Rscript not found: R columns skipped (install r-base and r-cran-lme4 to compare with lme4)"
    try:
        r = subprocess.run([exe, "-e", "suppressPackageStartupMessages(library(lme4)); cat(format(packageVersion('lme4')))"],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"Rscript did not run ({err}): R columns skipped"
    if r.returncode != 0:
        return "R package lme4 not installed: R columns skipped (install r-cran-lme4)"
    return None


def lme4_version() -> str:
    r = subprocess.run(["Rscript", "-e", "cat(R.version.string, '| lme4', format(packageVersion('lme4')))"],
                       capture_output=True, text=True, timeout=120)
    return r.stdout.strip()


def _run(code: str, df: pd.DataFrame, timeout: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="te_bench_r_") as tmp:
        csv = Path(tmp) / "data.csv"
        df.to_csv(csv, index=False)
        script = Path(tmp) / "fit.R"
        script.write_text(_PRELUDE + code)
        r = subprocess.run(["Rscript", str(script), str(csv)], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"Rscript failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    res = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition("=")
        if _:
            res[k] = float(v) if v not in ("TRUE", "FALSE") else float(v == "TRUE")
    return res


def lmer(y: np.ndarray, x: np.ndarray, t: np.ndarray, *, profile: bool, timeout: float = 3600) -> dict[str, float]:
    """``lmer(y ~ x + (1 | t), REML = TRUE)``: ``fit_s``, estimates (``b0``, ``b1``, ``var_t``,
    ``var_e``), ``singular``; with ``profile`` also ``confint_s`` and the therapist SD's interval."""
    df = pd.DataFrame({"y": y, "x": x, "t": t})
    return _run(_LMER.replace("PROFILE", "TRUE" if profile else "FALSE"), df, timeout)


def glmer(y: np.ndarray, X: np.ndarray, t: np.ndarray, *, n_agq: int = 10, timeout: float = 3600) -> dict[str, float]:
    """``glmer(y ~ 0 + X + (1 | t), binomial)`` with nAGQ = 1 (Laplace) and ``n_agq``: ``fit_s_agq1``,
    ``fit_s_agq<n>``, the therapist variance and the log-likelihood of each."""
    df = pd.DataFrame({"y": y, "t": t, **{f"x{j}": X[:, j] for j in range(X.shape[1])}})
    return _run(_GLMER.replace("NAGQ", str(int(n_agq))), df, timeout)
