"""The package version (a leaf module, so the store can stamp manifests without importing the package root)."""

__version__ = "0.1.0"
