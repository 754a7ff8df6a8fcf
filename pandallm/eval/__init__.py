"""Evaluation: generation metrics, and benchmarks through lm-evaluation-harness."""
