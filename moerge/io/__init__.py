"""Lazy checkpoint I/O: shard index, memory-mapped loader, streaming sharded writer, atomic output."""

from .atomic import atomic_output
from .index import CheckpointIndex, TensorInfo
from .loader import TensorLoader
from .writer import ShardedWriter, TensorSpec

__all__ = ["CheckpointIndex", "ShardedWriter", "TensorInfo", "TensorLoader", "TensorSpec", "atomic_output"]
