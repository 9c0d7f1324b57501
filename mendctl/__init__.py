"""mendctl: MEND (Meta Demonstration Distillation) as a config-driven tool."""
__version__ = "0.1.0"


def __getattr__(name):
    # The vectors API pulls in torch and transformers: load it only when asked for.
    if name in ("load_vectors", "apply", "VectorsFile"):
        from . import vectors

        return getattr(vectors, name)
    if name in ("Mend", "Vectors"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
