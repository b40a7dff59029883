# Reference values for model comparison (therapist_effects.models.comparison): lme4's AIC(), BIC(), logLik()
# and the df it counts, and likelihood-ratio tests from anova().
#
#   cd tests/reference && Rscript comparison.R      # writes comparison.json
#
# R 4.2.2, lme4 1.1-31. For REML fits lme4's AIC()/BIC() use the REML criterion (logLik(fit) of a
# REML fit) with df = fixed effects + covariance parameters + residual variance, and nobs = patients.
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
fb <- read.csv("therapy_feedback.csv")
tr <- read.csv("therapy_trials.csv")
fb$control <- 1 - fb$feedback
ctrl <- glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
ic <- function(m) list(
  logLik = as.numeric(logLik(m)), df = attr(logLik(m), "df"), nobs = nobs(m),
  REML = if (inherits(m, "lmerMod")) isREML(m) else FALSE, AIC = AIC(m), BIC = BIC(m))
models <- list(
  therapy_feedback = list(
    ri_REML = lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), fb, REML = TRUE),
    ri_ML = lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), fb, REML = FALSE),
    ri_noarm_ML = lmer(phq9_post ~ phq9_pre + (1 | therapist_id), fb, REML = FALSE),
    arm_REML = lmer(phq9_post ~ phq9_pre + feedback + (0 + control | therapist_id) +
                      (0 + feedback | therapist_id), fb, REML = TRUE),
    arm_corr_REML = lmer(phq9_post ~ phq9_pre + feedback + (0 + control + feedback | therapist_id), fb,
                         REML = TRUE),
    slope_REML = lmer(phq9_post ~ phq9_pre + feedback + (1 + feedback | therapist_id), fb, REML = TRUE),
    lm = lm(phq9_post ~ phq9_pre + feedback, fb),
    logit_laplace = glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), fb, binomial, nAGQ = 1,
                          control = ctrl),
    logit_agq10 = glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), fb, binomial, nAGQ = 10,
                        control = ctrl)
  ),
  therapy_trials = list(
    ri_REML = lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), tr, REML = TRUE),
    nested_REML = lmer(phq9_post ~ phq9_pre + feedback + (1 | trial_id/therapist_id), tr, REML = TRUE),
    trialfixed_REML = lmer(phq9_post ~ phq9_pre + feedback + trial_id + (1 | therapist_id), tr, REML = TRUE)
  )
)
formulas <- lapply(models, function(ms) lapply(ms, function(m) paste(trimws(deparse(formula(m))), collapse = " ")))
crit <- lapply(models, function(ms) lapply(ms, ic))
for (ds in names(crit)) for (nm in names(crit[[ds]])) crit[[ds]][[nm]]$formula <- formulas[[ds]][[nm]]
lrt_row <- function(a) list(statistic = a$Chisq[2], df = a$Df[2], p_value_chisq = a[["Pr(>Chisq)"]][2])
f <- models$therapy_feedback
t <- models$therapy_trials
tests <- list(
  # fixed effects differ: anova() refits both by ML (the default refit = TRUE)
  arm_fixed_effect_ML = lrt_row(anova(f$ri_REML, lmer(phq9_post ~ phq9_pre + (1 | therapist_id), fb))),
  # same fixed effects: REML criteria compared (refit = FALSE); interior null (arm effects uncorrelated)
  arm_vs_arm_corr_REML = lrt_row(anova(f$arm_REML, f$arm_corr_REML, refit = FALSE)),
  # variance on the boundary: anova's chi2_1 p-value; the 50:50 mixture p-value is half of it
  nested_vs_ri_REML = lrt_row(anova(t$ri_REML, t$nested_REML, refit = FALSE)),
  # slope variance and covariance: anova's chi2_2 p-value (the mixture is 0.5 chi2_1 + 0.5 chi2_2)
  slope_vs_ri_REML = lrt_row(anova(f$ri_REML, f$slope_REML, refit = FALSE)),
  # therapist variance against the linear model without therapists (ML)
  ri_vs_lm_ML = list(statistic = as.numeric(2 * (logLik(f$ri_ML) - logLik(f$lm))), df = 1)
)
out <- list(generator = "tests/reference/comparison.R", R = R.version.string,
            lme4 = as.character(packageVersion("lme4")), criteria = crit, lrt = tests)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "comparison.json")
