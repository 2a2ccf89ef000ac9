"""Inference: generation and evaluation."""
