//! The paged KV cache, in two halves that meet only through block ids: `pool` decides
//! which blocks each sequence owns (bookkeeping, no memory), `storage` holds the keys and
//! values those blocks stand for (memory, no bookkeeping).

pub mod pool;
pub mod storage;

pub use pool::{dead_blocks, extend_hashes, BlockHash, BlockPool, HOLE};
pub use storage::{
    CacheShape, KvDType, KvLayout, KvStorage, LayerKv, LayerKvMut, Ring, WindowLayers,
};
