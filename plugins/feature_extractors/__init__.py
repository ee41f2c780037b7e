"""Built-in feature extractors (FVD features, classifiers)."""
