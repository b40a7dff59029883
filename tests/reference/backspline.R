# R's predict(backSpline(interpSpline(y ~ x)), at) (splines package), which lme4's confint() of a
# profile uses to read off the interval limits; for tests of arm_inference._r_backspline_predict.
# Writes backspline.json. Run from tests/reference.
suppressPackageStartupMessages({library(splines); library(jsonlite)})
case <- function(x, y, at) {
  p <- predict(backSpline(interpSpline(x, y)), at)$y
  list(x = x, y = y, at = at, value = p)
}
x1 <- c(0, 0.3, 0.7, 1.2, 1.8, 2.5, 3.3)
x2 <- c(0.1, 0.5, 1.1, 1.4, 2.0, 2.2)
x3 <- c(0, 1, 2.5, 3)
out <- list(
  generator = "tests/reference/backspline.R", R = R.version.string,
  splines = as.character(packageVersion("splines")),
  # increasing, concave then convex (a zeta-like signed root deviance)
  increasing = case(x1, 2 * (x1 - 1.2) + 0.3 * (x1 - 1.2)^3,
                    c(-2.4, -2.0, -1.5, -0.3, 0, 0.9, 1.96, 2.5, 5.7, 6.0)),
  # increasing and convex: the end adjustments of the back spline
  convex = case(x2, exp(x2) - 1, c(0.105, 0.2, 0.5, 1.0, 2.0, 3.0, 6.0, 8.0)),
  # decreasing (knots reversed)
  decreasing = case(x2, -sqrt(x2) * 3 + x2^2 / 10, c(-4.0, -3.5, -3.0, -2.0, -1.0, -0.9)),
  # four points: the smallest spline
  four = case(x3, c(-1, 0.2, 1.1, 2.5), c(-1, -0.5, 0, 1, 2, 2.5, 3))
)
write_json(out, "backspline.json", digits = NA, auto_unbox = TRUE, pretty = TRUE, na = "null")
