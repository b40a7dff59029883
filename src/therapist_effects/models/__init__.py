"""The model types: Gaussian (exact engine), logistic GLMM, Bayesian and growth models, their
design matrices and the dispatch of configured models (:mod:`.fitting`)."""
