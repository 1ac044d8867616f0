"""The package version, read by setuptools and ``astra --version``."""

__version__ = "0.1.0"
