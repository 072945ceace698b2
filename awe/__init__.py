"""awe: Affinity Weighted Embedding."""
