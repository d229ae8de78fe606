//! The KV cache's bookkeeping: a pool of fixed-size blocks and a block table per sequence.
//! The memory itself is [`crate::model::attention::KvStorage`]; this side decides which
//! blocks each sequence owns. Allocation and release are O(1) per block (a free stack, so
//! recently freed blocks — whose memory is already resident — are reused first).

use std::collections::HashMap;

use super::request::RequestId;

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
