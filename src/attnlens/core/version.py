"""The attnlens version (``attnlens.__version__``), in the core so that ``attnlens info`` reads it from below."""
__version__ = "0.1.0"
