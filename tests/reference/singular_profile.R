# Reference for profile intervals of a singular random-intercept fit (issue 9).
# Writes singular_profile.csv (the data) and singular_profile.json (lme4 results).
# Run from tests/reference:  Rscript singular_profile.R
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
# 8 therapists x 10 patients, no therapist effect: y = 1 + 0.5 x + e; first seed whose REML fit is singular
for (seed in 1:1000) {
  set.seed(seed)
  d <- data.frame(therapist = sprintf("T%02d", rep(1:8, each = 10)), x = round(rnorm(80), 6))
  d$y <- round(1 + 0.5 * d$x + rnorm(80), 6)
  fit <- lmer(y ~ x + (1 | therapist), data = d, REML = TRUE)
  if (isSingular(fit)) break
}
write.csv(d, "singular_profile.csv", row.names = FALSE)
fml <- lmer(y ~ x + (1 | therapist), data = d, REML = FALSE)
ci <- confint(fit, method = "profile", level = 0.95, oldNames = FALSE)   # profile() refits by ML
ci_ml <- confint(fml, method = "profile", level = 0.95, oldNames = FALSE)
out <- list(
  generator = "tests/reference/singular_profile.R", seed = seed,
  R = R.version.string, lme4 = as.character(packageVersion("lme4")),
  formula = "y ~ x + (1 | therapist)",
  REML = list(singular = isSingular(fit), logLik = as.numeric(logLik(fit)),
              therapist_sd = attr(VarCorr(fit)$therapist, "stddev")[[1]], sigma = sigma(fit),
              fixef = as.list(fixef(fit))),
  # confint(fit, method = "profile"): rows sd_(Intercept)|therapist, sigma, (Intercept), x
  confint_profile = list(rows = rownames(ci), lower = unname(ci[, 1]), upper = unname(ci[, 2])),
  confint_profile_ML = list(rows = rownames(ci_ml), lower = unname(ci_ml[, 1]), upper = unname(ci_ml[, 2]))
)
write_json(out, "singular_profile.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
