"""Page-cache warming: a model's files read into the node's page cache before its pod loads
them (``warmer.py``: triggers and bookkeeping; ``reader.py``: the reads; ``memory.py``: how
much memory may be used; ``resident.py``: what is in the page cache already).

Not to be confused with ``agent/cluster/warm.py``, which keeps CachedModels on the disk."""
