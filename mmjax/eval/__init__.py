"""Evaluation: one batched encoder, zero-shot for every tower, retrieval, linear probe, task evaluators, plots."""
