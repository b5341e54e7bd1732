"""Checkpoint folders you can trust: safetensors + JSON under a SHA-256 manifest, written atomically, verified,
found, pruned, and cleaned up after killed writers. Knows nothing of training: it stores what it is given."""

from ..exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "checkpoint": ("checkpoint_step", "find_checkpoints", "newest_intact", "prune_checkpoints", "read_checkpoint",
                   "verify_checkpoint", "write_checkpoint"),
})
