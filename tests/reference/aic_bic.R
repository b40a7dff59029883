# AIC / BIC of every model type as lme4 computes them (REML fits: from the REML criterion), for
# the aic/bic fields of estimates.json (issue 9). Writes aic_bic.json. Run from tests/reference.
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
fb <- read.csv("therapy_feedback.csv"); fb$therapist_id <- as.character(fb$therapist_id)
tr <- read.csv("therapy_trials.csv"); tr$therapist_id <- as.character(tr$therapist_id)
fb$control <- 1 - fb$feedback
ic <- function(fit) list(logLik = as.numeric(logLik(fit)), df = attr(logLik(fit), "df"),
                         AIC = AIC(fit), BIC = BIC(fit), nobs = nobs(fit))
out <- list(
  generator = "tests/reference/aic_bic.R", lme4 = as.character(packageVersion("lme4")),
  ri_REML = ic(lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), data = fb, REML = TRUE)),
  ri_ML = ic(lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), data = fb, REML = FALSE)),
  nested_REML = ic(lmer(phq9_post ~ phq9_pre + feedback + (1 | trial_id/therapist_id), data = tr, REML = TRUE)),
  arm_REML = ic(lmer(phq9_post ~ phq9_pre + feedback + (0 + control | therapist_id) + (0 + feedback | therapist_id),
                     data = fb, REML = TRUE)),
  logit_laplace = ic(glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), data = fb, family = binomial))
)
write_json(out, "aic_bic.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
