"""The Python API (docs/api.md): Mend and Vectors (mend.py) over one Engine (engine.py), the public
apply (apply.py), and the batching of concurrent requests a server shares (batching.py)."""
