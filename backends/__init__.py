"""Backend plugins shipped with mendctl; each registers itself under `mendctl.backends` in pyproject.toml."""
