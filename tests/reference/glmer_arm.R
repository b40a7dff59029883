# Reference values for the binomial arm-variance model (therapist_effects.models.glmm_arm).
#
#   cd tests/reference && Rscript glmer_arm.R      # writes glmer_arm.json
#
# R 4.2.2, lme4 1.1-31. Data: therapy_feedback.csv (2,070 patients, 60 therapists) and therapy_trials.csv
# (3,597 patients, 120 therapists); every therapist treats patients in both arms.
# Model: recovered ~ phq9_pre + feedback + (0 + c0 | therapist_id) + (0 + c1 | therapist_id), binomial,
# Laplace (nAGQ = 1; glmer refuses nAGQ > 1 for vector-valued random effects), with c0 = 1 - feedback and
# c1 = feedback: independent therapist effects on the logit scale, one variance per arm.
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
fit_one <- function(file) {
d <- read.csv(file)
d$c0 <- 1 - d$feedback
d$c1 <- d$feedback
ctrl <- glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
f <- recovered ~ phq9_pre + feedback + (0 + c0 | therapist_id) + (0 + c1 | therapist_id)
m <- glmer(f, family = binomial, data = d, nAGQ = 1, control = ctrl)
vc <- as.data.frame(VarCorr(m))
v0 <- vc$vcov[vc$var1 == "c0"]
v1 <- vc$vcov[vc$var1 == "c1"]
c <- pi^2 / 3
icc0 <- v0 / (v0 + c)
icc1 <- v1 / (v1 + c)
# profile intervals of the two SDs (squared: variances)
pr <- confint(m, parm = "theta_", method = "profile", oldNames = FALSE)
# the model without an arm difference: one common variance for the therapist x arm blocks
d$block <- interaction(d$therapist_id, d$feedback)
m_eq <- glmer(recovered ~ phq9_pre + feedback + (1 | block), family = binomial, data = d, nAGQ = 1,
              control = ctrl)
# the same with adaptive Gauss-Hermite quadrature (allowed for this scalar random effect): checks the
# quadrature of the arm model at s_control = s_feedback
m_eq10 <- glmer(recovered ~ phq9_pre + feedback + (1 | block), family = binomial, data = d, nAGQ = 10,
                control = ctrl)
stat <- as.numeric(2 * (logLik(m) - logLik(m_eq)))
list(
  laplace = list(
    formula = paste(trimws(deparse(f)), collapse = " "), n = nrow(d), n_therapists = length(unique(d$therapist_id)),
    fixed = as.list(fixef(m)), fixed_se = as.list(sqrt(diag(as.matrix(vcov(m))))),
    variance = list(c0 = v0, c1 = v1),
    variance_ci = list(c0 = as.numeric(pr["sd_c0|therapist_id", ])^2,
                       c1 = as.numeric(pr["sd_c1|therapist_id", ])^2),
    icc = list(control = icc0, feedback = icc1, ratio = icc1 / icc0, reduction = 1 - icc1 / icc0),
    logLik = as.numeric(logLik(m)), df = attr(logLik(m), "df"), AIC = AIC(m), BIC = BIC(m),
    singular = isSingular(m)
  ),
  equal_variances = list(
    formula = "recovered ~ phq9_pre + feedback + (1 | therapist_id:feedback)",
    variance = as.data.frame(VarCorr(m_eq))$vcov[1], logLik = as.numeric(logLik(m_eq)),
    lrt = list(statistic = stat, df = 1, p_value = pchisq(stat, 1, lower.tail = FALSE))
  ),
  equal_variances_agq10 = list(
    formula = "recovered ~ phq9_pre + feedback + (1 | therapist_id:feedback), nAGQ = 10",
    fixed = as.list(fixef(m_eq10)), variance = as.data.frame(VarCorr(m_eq10))$vcov[1],
    logLik = as.numeric(logLik(m_eq10))
  )
)
}
out <- list(
  generator = "tests/reference/glmer_arm.R",
  R = R.version.string, lme4 = as.character(packageVersion("lme4")),
  therapy_feedback = fit_one("therapy_feedback.csv"),
  therapy_trials = fit_one("therapy_trials.csv")
)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "glmer_arm.json")
