"""Evaluation: batched generation (generate), per-example metrics and their aggregation
(metrics), and the llama_evaluate.py stage (evaluate)."""
