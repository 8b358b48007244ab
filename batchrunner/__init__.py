"""batchrunner: many Cliprise generation jobs in, finished and verified media files out."""

__version__ = "0.1.0"
