# Reference for random-slope models fitted by the exact engine (issue 9).
# Writes random_slope_singular.csv (simulated data) and random_slope.json (lme4 results).
# Run from tests/reference:  Rscript random_slope.R
# Every fit: lmer(..., REML = TRUE, control = ctrl), bobyqa run to rhoend = 1e-12 so that lme4's
# own optimum is accurate to well below the 1e-6 tolerance of the tests.
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5),
                    check.conv.singular = "ignore")

summarise <- function(fit, slope) {
  vc <- VarCorr(fit)[[1]]
  sds <- attr(vc, "stddev")
  cor <- attr(vc, "correlation")[1, 2]
  v <- vcov(fit)
  list(formula = deparse(formula(fit)), slope = slope, REML = isREML(fit),
       theta = unname(getME(fit, "theta")), singular = isSingular(fit),
       therapist = unname(sds[1])^2, therapist_slope = unname(sds[2])^2, correlation = cor,
       residual = sigma(fit)^2, logLik = as.numeric(logLik(fit)),
       AIC = AIC(fit), BIC = BIC(fit),
       fixef = as.list(fixef(fit)), se = as.list(sqrt(diag(as.matrix(v)))),
       n = nobs(fit))
}

fb <- read.csv("therapy_feedback.csv")
fb$therapist_id <- as.character(fb$therapist_id)
# binary slope: the feedback indicator
bin <- lmer(phq9_post ~ phq9_pre + feedback + (1 + feedback | therapist_id), data = fb, REML = TRUE, control = ctrl)
re <- ranef(bin)$therapist_id
binary <- summarise(bin, "feedback")
binary$ranef <- list(therapist = rownames(re), intercept = unname(re[, 1]), slope = unname(re[, 2]))
ci <- confint(bin, method = "profile", level = 0.95, oldNames = FALSE)   # profile() refits by ML
binary$confint_profile <- list(rows = rownames(ci), lower = unname(ci[, 1]), upper = unname(ci[, 2]))
bin_ml <- lmer(phq9_post ~ phq9_pre + feedback + (1 + feedback | therapist_id), data = fb, REML = FALSE, control = ctrl)
# continuous slope: the intake score
cont <- lmer(phq9_post ~ phq9_pre + feedback + (1 + phq9_pre | therapist_id), data = fb, REML = TRUE, control = ctrl)
# the same with the slope variable centred: a well-conditioned optimum (the uncentred one is flat in
# the intercept variance at phq9_pre = 0, an extrapolation, so bobyqa stops ~1e-6 short there)
fb$pre_c <- fb$phq9_pre - mean(fb$phq9_pre)
cont_c <- lmer(phq9_post ~ pre_c + feedback + (1 + pre_c | therapist_id), data = fb, REML = TRUE, control = ctrl)

# singular case: 40 therapists x 20 patients (10 per arm), slope variance small, intercept-slope
# correlation -1 in the truth; the first seed whose REML fit is singular with |correlation| = 1
for (seed in 1:500) {
  set.seed(seed)
  k <- 40; m <- 20
  therapist <- sprintf("T%02d", rep(1:k, each = m))
  feedback <- rep(rep(0:1, each = m / 2), k)
  x <- round(rnorm(k * m, 15, 5), 4)
  a <- rnorm(k, 0, 0.6)
  s <- -0.5 * a
  y <- round(2 + 0.5 * x - 0.8 * feedback + a[rep(1:k, each = m)] + s[rep(1:k, each = m)] * feedback +
             rnorm(k * m, 0, 1.5), 4)
  d <- data.frame(therapist = therapist, feedback = feedback, x = x, y = y)
  sing <- lmer(y ~ x + feedback + (1 + feedback | therapist), data = d, REML = TRUE, control = ctrl)
  if (isSingular(sing) && abs(attr(VarCorr(sing)[[1]], "correlation")[1, 2]) > 1 - 1e-8) break
}
write.csv(d, "random_slope_singular.csv", row.names = FALSE)
singular <- summarise(sing, "feedback")
singular$seed <- seed

out <- list(generator = "tests/reference/random_slope.R", R = R.version.string,
            lme4 = as.character(packageVersion("lme4")),
            binary = binary, binary_ML = summarise(bin_ml, "feedback"),
            continuous = summarise(cont, "phq9_pre"), continuous_centred = summarise(cont_c, "pre_c"),
            singular = singular)
write_json(out, "random_slope.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
