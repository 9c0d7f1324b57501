"""mendctl: MEND (Meta Demonstration Distillation) as a config-driven tool."""
from .core import __version__


def __getattr__(name):
    # The vectors API pulls in torch and transformers: load it only when asked for.
    if name in ("load_vectors", "VectorsFile"):
        from .core import vectors

        return getattr(vectors, name)
    if name in ("Mend", "Vectors"):
        from .api import mend

        return getattr(mend, name)
    if name == "apply":
        from .api.apply import apply

        return apply
    raise AttributeError(name)
