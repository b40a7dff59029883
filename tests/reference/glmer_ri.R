# Reference values for the random-intercept logistic GLMM (therapist_effects.models.glmm) on a small data set
# with a clearly positive therapist variance (the profile interval of the variance has a lower end > 0).
#
#   cd tests/reference && Rscript glmer_ri.R      # writes glmer_ri.json (about 1 minute)
#
# R 4.2.2, lme4 1.1-31. Data: glmer_ri.csv, 554 simulated patients of 30 therapists (caseloads 8-29),
# one covariate x; simulated by numpy default_rng(20261129): y ~ Bernoulli(expit(-0.4 + 0.6 x + u_j)),
# u_j ~ N(0, 0.9^2). Model: glmer(y ~ x + (1 | therapist), family = binomial, nAGQ = 1 and 10).
# Per fit: fixef; sqrt(diag(vcov)); VarCorr variance; logLik; confint(method = "profile") at levels 0.95
# and 0.80 (the therapist SD interval squared: a variance interval); confint(method = "Wald") for the
# fixed effects; ranef and its conditional SD sqrt(attr(ranef(condVar = TRUE), "postVar")); isSingular.
# `glm`: logLik of glm(y ~ x, family = binomial), the model without therapist effect.
# Control: glmerControl(tolPwrss = 1e-12, optimizer = "bobyqa", optCtrl = list(rhoend = 1e-10)). With
# lme4's default tolPwrss (1e-7) the Laplace fit stops with conditional modes that are not converged
# and its logLik (-319.5112) is 4.2e-4 below the Laplace approximation evaluated exactly at its own
# estimates; with tolPwrss = 1e-12 the logLik is -319.5108 and the estimates move by ~5e-4 relative.
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
d <- read.csv("glmer_ri.csv")
ctrl <- glmerControl(tolPwrss = 1e-12, optimizer = "bobyqa", optCtrl = list(rhoend = 1e-10))
fit_entry <- function(nAGQ) {
  m <- glmer(y ~ x + (1 | therapist), data = d, family = binomial, nAGQ = nAGQ, control = ctrl)
  profile_ci <- function(level) {
    ci <- confint(m, method = "profile", level = level, oldNames = FALSE)
    list(variance = unname(ci["sd_(Intercept)|therapist", ])^2,
         fixed = lapply(list(`(Intercept)` = "(Intercept)", x = "x"), function(r) unname(ci[r, ])))
  }
  wald <- confint(m, method = "Wald", parm = "beta_")
  re <- ranef(m, condVar = TRUE)$therapist
  list(
    call = sprintf("glmer(y ~ x + (1 | therapist), data = glmer_ri.csv, family = binomial, nAGQ = %d, control = ctrl)", nAGQ),
    fixed = as.list(fixef(m)),
    fixed_se = as.list(sqrt(diag(as.matrix(vcov(m))))),
    variance = as.data.frame(VarCorr(m))$vcov[1],
    logLik = as.numeric(logLik(m)),
    singular = isSingular(m),
    profile_95 = profile_ci(0.95),
    profile_80 = profile_ci(0.80),
    wald_95 = lapply(list(`(Intercept)` = "(Intercept)", x = "x"), function(r) unname(wald[r, ])),
    ranef = list(therapist = rownames(re), effect = re[, 1],
                 effect_sd = sqrt(as.numeric(attr(re, "postVar"))))
  )
}
g <- glm(y ~ x, data = d, family = binomial)
out <- list(
  generator = "tests/reference/glmer_ri.R", R = R.version.string, lme4 = format(packageVersion("lme4")),
  laplace = fit_entry(1), agq10 = fit_entry(10),
  glm = list(call = "glm(y ~ x, data = glmer_ri.csv, family = binomial)", logLik = as.numeric(logLik(g)),
             coef = as.list(coef(g)))
)
write_json(out, "glmer_ri.json", digits = 10, auto_unbox = TRUE, pretty = TRUE)
