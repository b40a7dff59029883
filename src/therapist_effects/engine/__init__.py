"""The likelihood machinery behind every Gaussian therapist model.

- :mod:`.inference`: profile-likelihood limits (bracketing outward to the edge of the parameter
  space), the one seeded parametric bootstrap, Wald and percentile intervals. Engine-agnostic:
  functions of a criterion callable and parameter bounds.
"""
