# Reference values for therapist_effects.meta.pool: metafor::rma() random-effects models.
#
#   Rscript tests/reference/metafor.R      (from the repository root; R 4.2.2, metafor 3.8-1, jsonlite)
#
# writes tests/reference/metafor.json: for each yi/vi set and each method (REML, DL, PM) and test
# ("z", "knha"), the pooled estimate, se, ci.lb, ci.ub, tau2, I2, QE and predict()'s pi.lb / pi.ub,
# plus weights() and leave1out() of the z-test fits.
#
# The fits use control = list(threshold = 1e-10, tol = 1e-10): metafor's defaults stop REML's Fisher
# scoring when tau2 changes by less than 1e-5 and PM's uniroot() at tol = .Machine$double.eps^0.25,
# which moves the 5th-6th significant digit of tau2 (and so of everything else) away from the
# estimator's exact value. The default-control fits are stored too, under "default_control", to show
# how close they are.
suppressPackageStartupMessages({library(metafor); library(jsonlite)})

sets <- list(
  # per-trial logit ICCs of therapy_trials.csv (lme4_reference.json, per_trial): two singular trials
  # with huge vi; tau2 is truncated at 0 by every estimator
  trials_logit = list(
    yi = c(-3.432397198, -3.958045518, -3.743923456, -9.210240367, -9.210240367, -3.596804613),
    vi = c(0.4153157359, 0.9283804632, 0.5990862755, 12553.86433, 13673.86966, 0.474336704)),
  # heterogeneous: tau2 clearly > 0
  heterogeneous = list(
    yi = c(0.10, 0.35, -0.05, 0.62, 0.21, 0.48, 0.02, 0.30),
    vi = c(0.010, 0.030, 0.015, 0.050, 0.008, 0.040, 0.020, 0.012)),
  # homogeneous: Q < k - 1, so tau2 truncates at 0 (REML, DL and PM)
  homogeneous = list(
    yi = c(0.20, 0.22, 0.19, 0.21, 0.20),
    vi = c(0.010, 0.020, 0.015, 0.010, 0.030)),
  # Fisher-z ICCs with one near-zero study (ICC 0.001) among ICCs of .015-.11, heterogeneous
  near_zero = list(
    yi = c(0.0010, 0.0800, 0.0210, 0.1100, 0.0405, 0.0150),
    vi = c(0.00110, 0.00080, 0.00150, 0.00070, 0.00120, 0.00095))
)

out <- list(metafor = as.character(packageVersion("metafor")), R = R.version.string, sets = sets, fits = list())
for (s in names(sets)) {
  for (m in c("REML", "DL", "PM")) {
    for (tst in c("z", "knha")) {
      fit <- rma(yi, vi, data = as.data.frame(sets[[s]]), method = m, test = tst,
                 control = list(threshold = 1e-10, tol = 1e-10))
      fit0 <- rma(yi, vi, data = as.data.frame(sets[[s]]), method = m, test = tst)
      p <- predict(fit)
      entry <- list(set = s, method = m, test = tst,
                    estimate = as.numeric(coef(fit)), se = fit$se, ci.lb = fit$ci.lb, ci.ub = fit$ci.ub,
                    tau2 = fit$tau2, I2 = fit$I2, QE = fit$QE, pi.lb = p$pi.lb, pi.ub = p$pi.ub,
                    weights = as.numeric(weights(fit)),
                    default_control = list(estimate = as.numeric(coef(fit0)), se = fit0$se, tau2 = fit0$tau2))
      if (tst == "z") {
        l1 <- leave1out(fit)
        entry$leave1out <- list(estimate = l1$estimate, se = l1$se, ci.lb = l1$ci.lb, ci.ub = l1$ci.ub,
                                tau2 = l1$tau2, I2 = l1$I2)
      }
      out$fits[[length(out$fits) + 1]] <- entry
    }
  }
}
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE), "tests/reference/metafor.json")
