# Reference for the ICC ratio's profile in the binomial random-slope model (therapist_effects.models.glmm_slope).
#
#   cd tests/reference && Rscript glmer_slope_ratio.R      # writes glmer_slope_ratio.json (seconds)
#
# R 4.2.2, lme4 1.1-31. In (1 + feedback | therapist_id) the control-arm effect is w0 = u0 and the
# feedback-arm effect w1 = u0 + u1. Equal per-arm variances (ICC ratio = 1) with a free correlation is
# w0 = a + b, w1 = a - b with a, b independent, i.e. (1 | therapist_id) + (0 + k | therapist_id) with
# k = +1 (control), -1 (feedback). Its logLik is the ratio's profile log-likelihood at 1.
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
fit_one <- function(file) {
  d <- read.csv(file)
  d$k <- 1 - 2 * d$feedback
  ctrl <- glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
  m <- glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id) + (0 + k | therapist_id), family = binomial,
             data = d, nAGQ = 1, control = ctrl)
  vc <- as.data.frame(VarCorr(m))
  list(formula = "recovered ~ phq9_pre + feedback + (1 | therapist_id) + (0 + k | therapist_id), k = 1 - 2 feedback",
       logLik = as.numeric(logLik(m)),                         # logLik(m)
       variance_a = vc$vcov[vc$var1 == "(Intercept)"], variance_b = vc$vcov[vc$var1 == "k"])
}
out <- list(generator = "tests/reference/glmer_slope_ratio.R", R = R.version.string,
            lme4 = as.character(packageVersion("lme4")),
            therapy_feedback = fit_one("therapy_feedback.csv"), therapy_trials = fit_one("therapy_trials.csv"))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "glmer_slope_ratio.json")
