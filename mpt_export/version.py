"""The package version (one place: the facade, the manifest and the CLI read it here)."""

__version__ = "0.1.0"
