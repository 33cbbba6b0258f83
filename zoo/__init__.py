"""attention-zoo: every efficient-attention mechanism of note, runnable and checked.

    >>> import zoo
    >>> layer = zoo.create("linear-transformer", dim=64, heads=4, causal=True)
"""

from zoo.catalog import CatalogError, Entry
from zoo.registry import UnknownEntry, create, entry, load, names

__all__ = ["CatalogError", "Entry", "UnknownEntry", "create", "entry", "load", "names"]
__version__ = "0.1.0"
