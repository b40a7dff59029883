#!/usr/bin/env Rscript
# Regenerates tests/reference/lme4_reference.json from the committed CSVs in tests/reference/.
#
#   cd tests/reference && Rscript lme4_reference.R [output.json]     # default: lme4_reference.json
#
# Written for R 4.2.2 with lme4 1.1-31, glmmTMB 1.1.5, metafor 3.8-1 and jsonlite (Debian:
# r-cran-lme4, r-cran-glmmtmb, r-cran-metafor, r-cran-jsonlite). Numbers are written with 10
# significant digits. Conventions (see README.md): variances, not SDs; `variance_ci` holds lme4's
# profile-likelihood 95% intervals (confint(fit, method = "profile")) squared from the SD scale.
# lme4's profile() of a REML fit profiles the ML deviance, so the intervals of a REML fit and of the
# ML fit of the same model coincide. `lme4_fit_seconds` is wall time and differs from run to run.
# Checked against the committed JSON (R 4.2.2, lme4 1.1-31, glmmTMB 1.1.5, metafor 3.8-1): every
# lmer / glmmTMB / metafor number is reproduced to the 10 printed digits except exam lrt_REML, which
# differs in the 10th digit (<= 2e-9 relative: optimiser noise); the glmer numbers (logit_laplace,
# logit_agq10) are reproduced to 4e-8 relative for the fixed effects and 5e-6 for the therapist
# variance (Laplace) and to 4e-5 (AGQ, therapy_trials): the optimum of the nearly flat binomial
# likelihood depends on the optimiser's path, and no glmerControl setting tried (bobyqa,
# Nelder_Mead, nloptwrap, tighter rhoend) gives the committed values exactly. The tests' tolerance
# for Laplace/AGQ is 1e-3 relative.
suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
  library(metafor)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
out_path <- if (length(args)) args[1] else "lme4_reference.json"

exam <- read.csv("exam.csv")
exam$school <- factor(exam$school)
dyestuff <- read.csv("dyestuff.csv")
feedback <- read.csv("therapy_feedback.csv")
trials <- read.csv("therapy_trials.csv")
for (nm in c("feedback", "trials")) {
  d <- get(nm)
  d$control <- 1 - d$feedback
  assign(nm, d)
}

# one lmer fit in the JSON's layout; `ci`: add lme4 profile intervals
entry <- function(formula, data, REML, ci = FALSE) {
  t0 <- proc.time()[["elapsed"]]
  fit <- lmer(formula, data = data, REML = REML)
  secs <- proc.time()[["elapsed"]] - t0
  vc <- as.data.frame(VarCorr(fit))
  vnames <- ifelse(is.na(vc$var1), vc$grp, paste0(vc$grp, ":", vc$var1))
  e <- list(
    formula = deparse(formula(fit)),
    REML = isREML(fit),
    n = nobs(fit),
    fixed = as.list(fixef(fit)),
    # one coefficient: an unnamed one-element array, as in the committed file
    fixed_se = if (length(fixef(fit)) == 1) list(unname(sqrt(diag(vcov(fit))))) else as.list(sqrt(diag(vcov(fit)))),
    variance = setNames(as.list(vc$vcov), vnames),
    logLik = as.numeric(logLik(fit)),
    singular = isSingular(fit),
    lme4_fit_seconds = secs
  )
  if (ci) {
    prof <- confint(fit, method = "profile", oldNames = FALSE)
    vrows <- grep("^(sd_|sigma$)", rownames(prof))
    e$variance_ci <- lapply(setNames(vrows, rownames(prof)[vrows]), function(i) unname(prof[i, ]^2))
    frows <- setdiff(seq_len(nrow(prof)), grep("^(sd_|cor_|sigma$)", rownames(prof)))
    e$fixed_ci <- lapply(setNames(frows, rownames(prof)[frows]), function(i) unname(prof[i, ]))
  }
  e
}

# glmer: fixed effects, therapist variance, log-likelihood
glmer_entry <- function(data, nAGQ) {
  fit <- glmer(recovered ~ phq9_pre + feedback + (1 | therapist_id), data = data, family = binomial,
               nAGQ = nAGQ)
  vc <- as.data.frame(VarCorr(fit))
  list(fixed = as.list(fixef(fit)),
       variance = setNames(as.list(vc$vcov), paste0(vc$grp, ":", vc$var1)),
       logLik = as.numeric(logLik(fit)))
}

# glmmTMB's diag() structure: an independent therapist variance per arm, REML
tmb_entry <- function(data) {
  fit <- glmmTMB(phq9_post ~ phq9_pre + feedback + diag(0 + factor(feedback) | therapist_id),
                 data = data, REML = TRUE)
  v <- diag(VarCorr(fit)$cond$therapist_id)
  list(variance = as.list(v), sigma2 = sigma(fit)^2)
}

ri <- phq9_post ~ phq9_pre + feedback + (1 | therapist_id)
arm <- phq9_post ~ phq9_pre + feedback + (0 + control | therapist_id) + (0 + feedback | therapist_id)

ref <- list(
  generator = "R lme4/glmmTMB/metafor",
  R = R.version.string,
  lme4 = format(packageVersion("lme4")),
  glmmTMB = format(packageVersion("glmmTMB")),
  metafor = format(packageVersion("metafor"))
)

ref$exam <- list(
  null_ML = entry(normexam ~ 1 + (1 | school), exam, REML = FALSE, ci = TRUE),
  null_REML = entry(normexam ~ 1 + (1 | school), exam, REML = TRUE, ci = TRUE),
  lrt_REML = entry(normexam ~ standLRT + (1 | school), exam, REML = TRUE, ci = TRUE),
  lrt_ML = entry(normexam ~ standLRT + (1 | school), exam, REML = FALSE, ci = TRUE)
)
ref$dyestuff <- list(null_REML = entry(Yield ~ 1 + (1 | Batch), dyestuff, REML = TRUE, ci = TRUE))

ref$therapy_feedback <- list(
  ri_REML = entry(ri, feedback, REML = TRUE, ci = TRUE),
  ri_ML = entry(ri, feedback, REML = FALSE),
  arm_REML = entry(arm, feedback, REML = TRUE, ci = TRUE),
  logit_laplace = glmer_entry(feedback, 1),
  logit_agq10 = glmer_entry(feedback, 10),
  arm_glmmTMB_REML = tmb_entry(feedback)
)

# per-trial random-intercept ICCs, Donner's large-sample variance (n0 = n / k) and the logit scale
per_trial <- do.call(rbind, lapply(sort(unique(trials$trial_id)), function(s) {
  d <- trials[trials$trial_id == s, ]
  fit <- lmer(ri, data = d, REML = TRUE)
  vc <- as.data.frame(VarCorr(fit))$vcov
  icc <- vc[1] / sum(vc)
  n <- nrow(d)
  k <- length(unique(d$therapist_id))
  n0 <- n / k
  var_icc <- 2 * (1 - icc)^2 * (1 + (n0 - 1) * icc)^2 / (n0 * (n0 - 1) * (k - 1))
  p <- max(icc, 1e-4)
  data.frame(trial = s, n = n, k = k, icc = icc, var_icc = var_icc, yi = qlogis(p),
             vi = var_icc / (p * (1 - icc))^2, row.names = s)
}))
pooled <- function(method) rma(yi = per_trial$yi, vi = per_trial$vi, method = method)
dl <- pooled("DL")
reml <- pooled("REML")

ref$therapy_trials <- list(
  ri_REML = entry(ri, trials, REML = TRUE, ci = TRUE),
  ri_ML = entry(ri, trials, REML = FALSE),
  arm_REML = entry(arm, trials, REML = TRUE, ci = TRUE),
  trialfixed_REML = entry(phq9_post ~ phq9_pre + feedback + trial_id + (1 | therapist_id), trials, REML = TRUE),
  nested_REML = entry(phq9_post ~ phq9_pre + feedback + (1 | trial_id/therapist_id), trials, REML = TRUE),
  arm_trialfixed_REML = entry(phq9_post ~ phq9_pre + feedback + trial_id + (0 + control | therapist_id) +
                                (0 + feedback | therapist_id), trials, REML = TRUE),
  per_trial = per_trial,
  pooled_logit_icc = list(DL = as.data.frame(coef(summary(dl))), REML = as.data.frame(coef(summary(reml))),
                          tau2_DL = dl$tau2, tau2_REML = reml$tau2),
  logit_laplace = glmer_entry(trials, 1),
  logit_agq10 = glmer_entry(trials, 10),
  arm_glmmTMB_REML = tmb_entry(trials)
)

writeLines(toJSON(ref, auto_unbox = TRUE, pretty = TRUE, digits = I(10)), out_path)
cat("wrote", out_path, "\n")
