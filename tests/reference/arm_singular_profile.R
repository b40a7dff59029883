# lme4's profile intervals of an arm model whose feedback-arm therapist variance is estimated at 0
# (the first 8 therapists of therapy_feedback.csv), for the lme4-style profile of a variance at
# the boundary (tests/test_mutation_kills_arm.py). Writes arm_singular_profile.json. Run from tests/reference.
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
fb <- read.csv("therapy_feedback.csv"); fb$therapist_id <- as.character(fb$therapist_id)
d <- fb[fb$therapist_id %in% sort(unique(fb$therapist_id))[1:8], ]
d$control <- 1 - d$feedback
fit <- lmer(phq9_post ~ phq9_pre + feedback + (0 + control | therapist_id) + (0 + feedback | therapist_id),
            data = d, REML = TRUE)
ci <- confint(fit, method = "profile", oldNames = FALSE)^2  # variance scale
vc <- as.data.frame(VarCorr(fit))
out <- list(
  generator = "tests/reference/arm_singular_profile.R", lme4 = as.character(packageVersion("lme4")),
  therapists = sort(unique(d$therapist_id)),
  variance = setNames(as.list(vc$vcov), c("control", "feedback", "Residual")),
  variance_ci = list(control = unname(ci["sd_control|therapist_id", ]),
                     feedback = unname(ci["sd_feedback|therapist_id", ]),
                     Residual = unname(ci["sigma", ]))
)
write_json(out, "arm_singular_profile.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
