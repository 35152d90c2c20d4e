"""tunesmith: turn a generalist generative model into a specialist."""

__version__ = "0.1.0"
