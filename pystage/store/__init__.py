"""The feature store: stage outputs computed once, kept in HDF5 files, streamed shuffled under a RAM budget."""
from pystage.store.entry import StoreEntry
from pystage.store.errors import (StoreArgumentError, StoreCorruptError, StoreDiskFullError, StoreError,
                                  StoreKeyMismatchError, StoreLockTimeout, StoreNotFoundError, StoreVersionError)
from pystage.store.keys import StoreKey, dataset_fingerprint
from pystage.store.manage import EntryInfo, StoreProblem
from pystage.store.sizes import parse_size
from pystage.store.store import FeatureStore, StoreConfig, default_root
from pystage.store.stream import StoreDataset

__all__ = ["EntryInfo", "FeatureStore", "StoreArgumentError", "StoreConfig", "StoreCorruptError", "StoreDataset",
           "StoreDiskFullError", "StoreEntry", "StoreError", "StoreKey", "StoreKeyMismatchError", "StoreLockTimeout",
           "StoreNotFoundError", "StoreProblem", "StoreVersionError", "dataset_fingerprint", "default_root", "parse_size"]
