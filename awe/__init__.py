"""awe: Affinity Weighted Embedding (Weston, Weiss, Yee 2013)."""

__version__ = "0.1.0"
