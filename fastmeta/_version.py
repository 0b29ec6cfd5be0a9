"""fastmeta's version: one place, read by pyproject.toml (without importing torch)."""

__version__ = "0.1.0"
