"""Backend plugins shipped with mendctl, installed as `mendctl.backends`; each registers itself under the
entry-point group `mendctl.backends` in pyproject.toml."""
