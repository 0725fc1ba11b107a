"""Data: bundled demo dataset, webdataset shards, streaming loaders, transforms."""
from .bundled import bundled_dataset
from .stream import StreamLoader, labeled_loader, pretrain_loader, resolve_source

__all__ = ["StreamLoader", "bundled_dataset", "labeled_loader", "pretrain_loader", "resolve_source"]
