# Reference for the optimum of the random-slope fit (issue 9): two simulated data sets where the
# engine's global Nelder-Mead search (engine.gaussian.minimise_theta) stopped on the correlation -1
# face of the boundary, above the optimum.
# random_slope_optimum_a.csv: 64 therapists x 19 patients; random_slope_optimum_b.csv: 72 x 12;
# columns y, x, s (0/1 slope variable), t (therapist); simulated with numpy (default_rng(59) and
# default_rng(20): y = 1 + 0.3 x + 0.2 s + a_t + b_t s + e, SDs (a, b) = (0.1, 0.3) and (0.1, 0.05)).
# Run from tests/reference:  Rscript random_slope_optimum.R   (writes random_slope_optimum.json)
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5),
                    check.conv.singular = "ignore")
out <- list(generator = "tests/reference/random_slope_optimum.R", R = R.version.string,
            lme4 = as.character(packageVersion("lme4")))
for (key in c("a", "b")) {
  d <- read.csv(sprintf("random_slope_optimum_%s.csv", key))
  d$t <- factor(d$t)
  fit <- lmer(y ~ x + s + (1 + s | t), data = d, REML = TRUE, control = ctrl)
  vc <- VarCorr(fit)[[1]]
  out[[key]] <- list(call = "lmer(y ~ x + s + (1 + s | t), REML = TRUE, control = ctrl)",
                     theta = unname(getME(fit, "theta")), REMLcrit = REMLcrit(fit),
                     logLik = as.numeric(logLik(fit)), singular = isSingular(fit),
                     therapist = unname(attr(vc, "stddev")[1])^2,
                     therapist_slope = unname(attr(vc, "stddev")[2])^2,
                     correlation = attr(vc, "correlation")[1, 2], residual = sigma(fit)^2,
                     fixef = as.list(fixef(fit)))
}
write_json(out, "random_slope_optimum.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
