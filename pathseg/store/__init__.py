"""The feature store: the on-disk contract both stages go through, and nothing else.

`feature_store` opens and creates stores and holds their image tables; `feature_arrays` the per-(timestep,
block) features, done flags and latents; `shard_reads` decodes whole shards straight from their files;
`integrity` is `cache verify` / `cache info` (it reads a store, never writes one); `identity` the store keys
and digests; `schema` the attrs checked on opening; `names` the feature-map names; `disk` durable writes
and damaged-chunk reads; `locking` one writer per store. The names below are what the stages use.
"""

from pathseg.store.feature_arrays import FeatureInfo
from pathseg.store.feature_store import FeatureStore, ImageEntry
from pathseg.store.identity import PRETRAIN_RECORD, digest, list_stores, software_versions, store_path_for
from pathseg.store.locking import store_lock
from pathseg.store.names import Z0_PAIR, feature_key, is_z0, pair_label

__all__ = [
    "PRETRAIN_RECORD", "Z0_PAIR", "FeatureInfo", "FeatureStore", "ImageEntry", "digest", "feature_key", "is_z0",
    "list_stores", "pair_label", "software_versions", "store_lock", "store_path_for",
]
