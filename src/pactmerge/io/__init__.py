"""Checkpoint I/O: lazy sources (one tensor read at a time) and a sharded, atomic writer."""

from pactmerge.io.sources import Source, open_source
from pactmerge.io.writer import ShardedWriter, atomic_output_dir

__all__ = ["Source", "open_source", "ShardedWriter", "atomic_output_dir"]
