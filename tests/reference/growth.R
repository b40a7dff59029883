# Reference values for the growth model (therapist_effects.models.growth), written to growth.json.
#   cd tests/reference && Rscript growth.R
# R 4.2, lme4 1.1-31, jsonlite. Data:
#   growth_demo.csv      the demo's sessions (data/demo_sessions.csv) after the package's exclusions,
#                        exported by therapist_effects.models.recovery.growth_frame (lt = log(session number))
#   growth_singular.csv  therapist_effects.models.growth.simulate_growth(30, 15, cov_T=((0.5, 0), (0, 0)), seed=1):
#                        no therapist slope variance; lme4's fit is singular
# For each fit: lme4's default fit ("default") and the same model refitted from the default's theta
# by nlminb with tolerances at machine precision ("refined"), so that the optimum itself is known
# to ~1e-10 in the criterion.
suppressMessages({library(lme4); library(jsonlite)})

fit_one <- function(d, REML) {
  f <- lmer(score ~ lt + (1 + lt | therapist) + (1 + lt | therapist:patient), data = d, REML = REML)
  # nlminb (PORT) with tolerances at machine precision; it ends with "singular convergence (7)",
  # i.e. no further decrease is possible, which is what is wanted here
  ctrl <- lmerControl(optimizer = "nlminbwrap",
                      optCtrl = list(rel.tol = 1e-15, x.tol = 1e-13, eval.max = 1e5, iter.max = 1e5),
                      check.conv.singular = "ignore")
  g <- suppressWarnings(update(f, start = getME(f, "theta"), control = ctrl))
  out <- list(default = summarise(f), refined = summarise(g))
  # conditional modes of the therapist effects and their conditional SDs (refined fit)
  re <- ranef(g, condVar = TRUE)$therapist
  pv <- attr(re, "postVar")
  out$refined$ranef_therapist <- list(therapist = rownames(re), intercept = re[["(Intercept)"]], slope = re[["lt"]],
                                      intercept_sd = sqrt(pv[1, 1, ]), slope_sd = sqrt(pv[2, 2, ]))
  out
}

summarise <- function(f) {
  vc <- as.data.frame(VarCorr(f))
  get <- function(grp, v1, v2 = NA) {
    r <- vc[vc$grp == grp & vc$var1 %in% v1 & (if (is.na(v2)) is.na(vc$var2) else vc$var2 %in% v2), ]
    r
  }
  fe <- fixef(f); se <- sqrt(diag(as.matrix(vcov(f))))
  list(
    formula = "score ~ lt + (1 + lt | therapist) + (1 + lt | therapist:patient)",
    REML = isREML(f),
    variance_components = list(
      therapist = get("therapist", "(Intercept)")$vcov,
      therapist_slope = get("therapist", "lt")$vcov,
      patient = get("therapist:patient", "(Intercept)")$vcov,
      patient_slope = get("therapist:patient", "lt")$vcov,
      residual = get("Residual", NA)$vcov),
    correlations = list(
      therapist = get("therapist", "(Intercept)", "lt")$sdcor,
      patient = get("therapist:patient", "(Intercept)", "lt")$sdcor),
    fixed_effects = as.list(fe), se = as.list(se),
    theta = as.list(getME(f, "theta")),
    criterion = if (isREML(f)) REMLcrit(f) else deviance(f),
    loglik = as.numeric(logLik(f)),
    singular = isSingular(f, tol = 1e-4),
    n_obs = nobs(f))
}

read <- function(path) read.csv(path, colClasses = c(patient = "character", therapist = "character"))
demo <- read("growth_demo.csv")
sing <- read("growth_singular.csv")
# arm-specific therapist slopes: (1 + ltc + ltf | therapist) with ltc = lt (1 - feedback), ltf = lt feedback
# (the fixed part has the arm and its interaction with time), as GrowthModel(..., arm_slopes=True)
fit_arm <- function(d) {
  d$ltc <- d$lt * (1 - d$feedback); d$ltf <- d$lt * d$feedback
  f <- lmer(score ~ lt + feedback + lt:feedback + (1 + ltc + ltf | therapist) + (1 + lt | therapist:patient),
            data = d, REML = TRUE)
  ctrl <- lmerControl(optimizer = "nlminbwrap",
                      optCtrl = list(rel.tol = 1e-15, x.tol = 1e-13, eval.max = 1e5, iter.max = 1e5),
                      check.conv.singular = "ignore")
  g <- suppressWarnings(update(f, start = getME(f, "theta"), control = ctrl))
  s <- function(f) {
    vc <- as.data.frame(VarCorr(f))
    v <- function(grp, v1) vc$vcov[vc$grp == grp & vc$var1 == v1 & is.na(vc$var2)]
    list(formula = deparse(formula(f), width.cutoff = 500L),
         variance_components = list(therapist = v("therapist", "(Intercept)"), "therapist_slope[0]" = v("therapist", "ltc"),
                                    "therapist_slope[1]" = v("therapist", "ltf"), patient = v("therapist:patient", "(Intercept)"),
                                    patient_slope = v("therapist:patient", "lt"), residual = vc$vcov[vc$grp == "Residual"]),
         fixed_effects = as.list(fixef(f)), criterion = REMLcrit(f), loglik = as.numeric(logLik(f)),
         singular = isSingular(f, tol = 1e-4))
  }
  list(default = s(f), refined = s(g))
}

out <- list(
  versions = list(R = R.version.string, lme4 = as.character(packageVersion("lme4"))),
  demo_REML = fit_one(demo, TRUE),
  demo_ML = fit_one(demo, FALSE),
  singular_REML = fit_one(sing, TRUE),
  demo_arm_REML = fit_arm(demo))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "growth.json")
