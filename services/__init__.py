"""textserve's service. The version is the project's (pyproject.toml reads it from here), so a
bento, which carries these files and not the package's metadata, knows it too."""

__version__ = "0.1.0"
