"""What every other package builds on, with neither torch nor transformers at import time (but
vectors.py): the recipe schema, backend names, partitions, vectors files and file I/O."""
__version__ = "0.1.0"
