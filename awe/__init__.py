"""awe: Affinity Weighted Embedding (Weston, Weiss, Yee 2013)."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import awe` stays light; `from awe import AWE` loads torch
    if name == "AWE":
        from .api import AWE

        return AWE
    raise AttributeError(name)


__all__ = ["AWE", "__version__"]
