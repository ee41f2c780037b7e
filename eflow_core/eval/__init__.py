"""Evaluation: Frechet distance, feature extraction, sample class accuracy."""
