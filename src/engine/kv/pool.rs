//! The KV cache's bookkeeping, following vLLM's `BlockPool`: a pool of fixed-size blocks
//! and a block table per sequence. The memory itself is [`super::KvStorage`]; this side
//! decides which blocks each sequence owns. Allocation and release are O(1) per block (a
//! free stack, so recently freed blocks — whose memory is already resident — are reused
//! first); a table lookup is O(1) (a hash map by request id).

use std::collections::HashMap;

use crate::engine::request::RequestId;

#[derive(Debug)]
pub struct BlockPool {
    free: Vec<u32>,
    num_blocks: usize,
    block_size: usize,
    tables: HashMap<RequestId, Vec<u32>>,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockPool {
            // Reversed so that block 0 is handed out first.
            free: (0..num_blocks as u32).rev().collect(),
            num_blocks,
            block_size,
            tables: HashMap::new(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Positions the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Grows `id`'s table to cover `slots` positions. All or nothing: false, with nothing
    /// taken, when too few blocks are free.
    pub fn reserve(&mut self, id: RequestId, slots: usize) -> bool {
        let have = self.tables.get(&id).map_or(0, Vec::len);
        let need = slots.div_ceil(self.block_size).saturating_sub(have);
        if need > self.free.len() {
            return false;
        }
        if need > 0 {
            let at = self.free.len() - need;
            self.tables
                .entry(id)
                .or_default()
                .extend(self.free.drain(at..));
        }
        true
    }

    /// Returns every block of `id` to the pool (nothing if it holds none).
    pub fn release(&mut self, id: RequestId) {
        if let Some(blocks) = self.tables.remove(&id) {
            self.free.extend(blocks);
        }
    }

    pub fn table(&self, id: RequestId) -> &[u32] {
        self.tables.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Checks the pool's invariant: every block is either free or in exactly one table.
    #[cfg(test)]
    pub fn check(&self) {
        let mut seen = vec![false; self.num_blocks];
        for &b in self.free.iter().chain(self.tables.values().flatten()) {
            assert!(!seen[b as usize], "block {b} is owned twice");
            seen[b as usize] = true;
        }
        assert!(seen.iter().all(|&s| s), "a block leaked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, Result};

    #[test]
    fn reserve_is_all_or_nothing_and_release_returns_every_block() -> Result<()> {
        let mut pool = BlockPool::new(4, 16);
        assert_eq!(pool.capacity_tokens(), 64);
        assert!(pool.reserve(1, 17)); // two blocks
        let mut table = pool.table(1).to_vec();
        table.sort_unstable();
        assert_eq!(table, [0, 1]);
        assert!(pool.reserve(1, 32)); // still two: nothing more taken
        assert_eq!(pool.num_free(), 2);
        assert!(!pool.reserve(2, 48), "three blocks granted from two");
        assert_eq!((pool.num_free(), pool.table(2)), (2, &[][..]));
        assert!(pool.reserve(2, 1));
        pool.check();
        pool.release(1);
        pool.release(1); // a second release is a no-op
        assert_eq!(pool.num_free(), 3);
        pool.check();
        // Freed blocks come back first (their memory is resident).
        assert!(pool.reserve(3, 16));
        let reused = pool.table(3)[0];
        if reused > 1 {
            return Err(Error::Internal(format!(
                "block {reused} handed out before 0 or 1"
            )));
        }
        pool.release(2);
        pool.release(3);
        assert_eq!(pool.num_free(), pool.num_blocks());
        pool.check();
        Ok(())
    }
}
