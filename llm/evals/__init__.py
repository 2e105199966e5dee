"""Evaluation: a run's metrics on its data splits (splits.py), continuations' log-likelihoods
(loglikelihood.py), the benchmarks the field quotes (benchmarks.py), and a run as an
lm-evaluation-harness model (harness.py)."""
