"""The models: the Backend base (a recipe -> LLM and distiller), the frozen LLM wrapper, the distiller,
its anchors and adapters, templates rendered to ids, and where model weights come from."""
