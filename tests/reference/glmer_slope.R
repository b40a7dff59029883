# Reference values for the binomial random-slope model (therapist_effects.models.glmm_slope).
#
#   cd tests/reference && Rscript glmer_slope.R      # writes glmer_slope.json
#
# R 4.2.2, lme4 1.1-31. Data: therapy_feedback.csv (2,070 patients, 60 therapists) and
# therapy_trials.csv (3,597 patients, 120 therapists).
# Model: recovered ~ phq9_pre + feedback + (1 + feedback | therapist_id), binomial, Laplace (nAGQ = 1;
# glmer refuses nAGQ > 1 for vector-valued random effects). On therapy_feedback the fit is singular
# (lme4's theta[3] = 0: intercept-slope correlation -1), on therapy_trials it is interior.
# Per-arm latent ICCs: control v0 = var(intercept), feedback v1 = var(intercept) + 2 cov + var(slope),
# ICC = v / (v + pi^2/3).
# Also: confint() profile intervals (both data sets; lme4's correlation interval on the singular
# therapy_feedback fit is [-1, 1], which its own uncorrelated fit contradicts), the arm parameterisation
# (0 + c0 + c1 | therapist_id) (the per-arm variances and their profile intervals) and the uncorrelated
# model (1 + feedback || therapist_id) (the correlation's profile at 0; on therapy_trials glmer warns
# max|grad| = 0.002, just above its tolerance 0.002). Runs ~20 minutes (the profiles).
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
fit_one <- function(file, profile = TRUE) {
d <- read.csv(file)
ctrl <- glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
f <- recovered ~ phq9_pre + feedback + (1 + feedback | therapist_id)
m <- glmer(f, family = binomial, data = d, nAGQ = 1, control = ctrl)
vc <- VarCorr(m)$therapist_id
v_int <- vc[1, 1]; v_slope <- vc[2, 2]; cv <- vc[1, 2]
cor <- attr(vc, "correlation")[1, 2]
c <- pi^2 / 3
v0 <- v_int
v1 <- v_int + 2 * cv + v_slope
icc0 <- v0 / (v0 + c)
icc1 <- v1 / (v1 + c)
out <- list(
  formula = paste(trimws(deparse(f)), collapse = " "), n = nrow(d), n_therapists = length(unique(d$therapist_id)),
  fixed = as.list(fixef(m)),                                   # fixef(m)
  fixed_se = as.list(sqrt(diag(as.matrix(vcov(m))))),          # sqrt(diag(vcov(m)))
  theta = as.numeric(getME(m, "theta")),                       # getME(m, "theta")
  variance = list(therapist = v_int, therapist_slope = v_slope, covariance = cv),   # VarCorr(m)
  correlation = cor,                                           # attr(VarCorr(m)$therapist_id, "correlation")
  variance_by_arm = list(control = v0, feedback = v1),
  icc = list(control = icc0, feedback = icc1, ratio = icc1 / icc0, reduction = 1 - icc1 / icc0),
  logLik = as.numeric(logLik(m)), df = attr(logLik(m), "df"),   # logLik(m)
  AIC = AIC(m), BIC = BIC(m),                                  # AIC(m), BIC(m)
  singular = isSingular(m)                                     # isSingular(m)
)
# the model with the correlation fixed at 0: its logLik is the correlation's profile at 0
m_unc <- glmer(recovered ~ phq9_pre + feedback + (1 + feedback || therapist_id), family = binomial, data = d,
               nAGQ = 1, control = ctrl)
out$uncorrelated <- list(formula = "recovered ~ phq9_pre + feedback + (1 + feedback || therapist_id)",
                         logLik = as.numeric(logLik(m_unc)))
if (profile) {
  # confint(m, parm = "theta_", method = "profile", oldNames = FALSE): SDs and the correlation
  pr <- tryCatch(suppressWarnings(confint(m, parm = "theta_", method = "profile", oldNames = FALSE)),
                 error = function(e) NULL)
  if (!is.null(pr)) out$profile_ci <- list(
    sd_intercept = as.numeric(pr["sd_(Intercept)|therapist_id", ]),
    sd_slope = as.numeric(pr["sd_feedback|therapist_id", ]),
    correlation = as.numeric(pr["cor_feedback.(Intercept)|therapist_id", ])
  )
  # The same model in the arm parameterisation (0 + c0 + c1 | therapist_id), c0 = 1 - feedback,
  # c1 = feedback: its SDs are the per-arm therapist SDs, so confint() gives the profile intervals of
  # the per-arm variances (and ICCs, a monotone map of them).
  d$c0 <- 1 - d$feedback
  d$c1 <- d$feedback
  ma <- glmer(recovered ~ phq9_pre + feedback + (0 + c0 + c1 | therapist_id), family = binomial, data = d,
              nAGQ = 1, control = ctrl)
  va <- VarCorr(ma)$therapist_id
  out$arm_parameterisation <- list(
    formula = "recovered ~ phq9_pre + feedback + (0 + c0 + c1 | therapist_id)",
    logLik = as.numeric(logLik(ma)), variance = list(c0 = va[1, 1], c1 = va[2, 2]),
    correlation = attr(va, "correlation")[1, 2]
  )
  pa <- tryCatch(suppressWarnings(confint(ma, parm = "theta_", method = "profile", oldNames = FALSE)),
                 error = function(e) NULL)
  if (!is.null(pa)) out$arm_parameterisation$profile_ci <- list(
    sd_c0 = as.numeric(pa["sd_c0|therapist_id", ]), sd_c1 = as.numeric(pa["sd_c1|therapist_id", ]),
    correlation = as.numeric(pa["cor_c1.c0|therapist_id", ])
  )
}
out
}
out <- list(
  generator = "tests/reference/glmer_slope.R",
  R = R.version.string, lme4 = as.character(packageVersion("lme4")),
  therapy_feedback = fit_one("therapy_feedback.csv", profile = TRUE),
  therapy_trials = fit_one("therapy_trials.csv", profile = TRUE)
)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "glmer_slope.json")
