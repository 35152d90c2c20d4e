"""tunesmith: turn a generalist generative model into a specialist."""

import os as _os

__version__ = "0.1.0"

# oneDNN (kernels/onednn_linear.py) keeps every primitive it builds, one per product shape, in two caches of 1,024
# entries each by default; a packed batch has a new token count at almost every step, so a long run grew by ~8 MiB
# per new count (measured: 3.4 GiB after 400). 64 entries hold a step's dozen shapes several times over. The
# variables are read when oneDNN first runs, so they are set here, before any of it does; a user's own value wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
_os.environ.setdefault("LRU_CACHE_CAPACITY", "64")
