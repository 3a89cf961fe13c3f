"""rankpipe: order images by a sentence with a frozen CLIP model and a ranking-aware adapter."""

__version__ = "0.1.0"
