//! The KV cache's bookkeeping, following vLLM's `BlockPool`: a pool of fixed-size blocks
//! and a block table per sequence. The memory itself is [`super::KvStorage`]; this side
//! decides which blocks each sequence owns.
//!
//! **Prefix caching** (vLLM's automatic prefix caching): once every position of a block is
//! computed, the block is named by [`block_hash`] of the previous block's hash and its
//! tokens. A sequence whose tokens begin the same way takes those blocks instead of
//! computing them again: blocks are shared, with reference counts, and never written once
//! full. A block nobody holds any more keeps its keys and values and its name; it is
//! evicted (the name forgotten, the block reused) only when a block is needed and no free
//! block without a name is left, least recently freed first.
//!
//! Free blocks are therefore of two kinds: `empty` ones (nothing cached; a stack, so that a
//! recently freed block, whose memory is resident, is reused first) and cached ones (a
//! doubly linked list in the order they were freed). Allocation, release, a hit and an
//! eviction are O(1) per block; a table lookup is O(1) (a hash map by request id).
//!
//! **Window layers** (sliding-window layers that keep only their window) have a pool of
//! their own, whose tables have holes ([`HOLE`]): [`BlockPool::release_before`] gives
//! back the blocks a sequence's window has left, named ones to the cache like any freed
//! block, and [`BlockPool::cached_window`] finds the blocks a hit needs (the window
//! before it), not the whole prefix.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::engine::request::RequestId;

/// The name of a full block: a hash chained over every block before it.
pub type BlockHash = u64;

/// Names a full block of `tokens` whose predecessor is named `parent` (`None` for a
/// sequence's first block), so that equal names mean equal prefixes. Keys and values
/// depend on nothing else in an engine (one model, one cache layout); a rotating cache,
/// whose blocks are rewritten as it wraps, does not cache.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    // SipHash with fixed keys: the same in every run of one build, which is all an
    // in-memory cache needs (saved prefixes store tokens, not hashes).
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Extends `hashes`, the names of the first blocks of `tokens`, to its first `full`
/// blocks of `block_size`.
pub fn extend_hashes(hashes: &mut Vec<BlockHash>, tokens: &[u32], block_size: usize, full: usize) {
    for i in hashes.len()..full {
        let parent = hashes.last().copied();
        hashes.push(block_hash(
            parent,
            &tokens[i * block_size..(i + 1) * block_size],
        ));
    }
}

/// No block (the ends of the free list).
const NIL: u32 = u32::MAX;

/// A table entry whose block was given back ([`BlockPool::release_before`]): its
/// positions are never read again.
pub const HOLE: u32 = u32::MAX;

/// Blocks of `block_size` of a sequence that no query of a layer with a window of
/// `window` reads once only positions `computed..` are left to run: the first such query
/// reads back to position `computed + 1 - window`.
pub fn dead_blocks(window: usize, block_size: usize, computed: usize) -> usize {
    (computed + 1).saturating_sub(window) / block_size
}

/// What a block holds while it is named: its tokens and its parent's name are checked on
/// every hit, so that handing out another prefix's keys and values takes two 64-bit
/// names colliding along with equal tokens.
#[derive(Debug)]
struct Name {
    hash: BlockHash,
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
}

#[derive(Debug)]
struct Block {
    /// Tables holding the block.
    refs: u32,
    name: Option<Name>,
    /// Neighbours in the list of free cached blocks (`NIL` outside it).
    prev: u32,
    next: u32,
}

/// One sequence's blocks.
#[derive(Debug, Default)]
struct Table {
    /// [`HOLE`]s first (given back), then blocks.
    blocks: Vec<u32>,
    /// Leading [`HOLE`]s (of the blocks given back, or of a window hit).
    holes: usize,
    /// Leading blocks already named (taken from the cache or named since).
    named: usize,
}

#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    block_size: usize,
    /// Free blocks holding nothing cached.
    empty: Vec<u32>,
    /// Free named blocks, least recently freed at `head`; evicted from there.
    head: u32,
    tail: u32,
    num_cached_free: usize,
    /// Named blocks, in use or free.
    by_hash: HashMap<BlockHash, u32>,
    tables: HashMap<RequestId, Table>,
    caching: bool,
}

impl BlockPool {
    /// `caching`: whether full blocks are named and shared (prefix caching).
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        let blocks = (0..num_blocks)
            .map(|_| Block {
                refs: 0,
                name: None,
                prev: NIL,
                next: NIL,
            })
            .collect();
        BlockPool {
            blocks,
            block_size,
            // Reversed so that block 0 is handed out first.
            empty: (0..num_blocks as u32).rev().collect(),
            head: NIL,
            tail: NIL,
            num_cached_free: 0,
            by_hash: HashMap::new(),
            tables: HashMap::new(),
            caching,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out (cached ones included: they are evicted then).
    pub fn num_free(&self) -> usize {
        self.empty.len() + self.num_cached_free
    }

    /// Named blocks, held or free.
    pub fn num_cached(&self) -> usize {
        self.by_hash.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Positions the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.blocks.len() * self.block_size
    }

    /// The cached blocks that begin a sequence whose full blocks are named `hashes` (of
    /// `tokens`): the longest run found, each block checked against its tokens. Changes
    /// nothing; [`BlockPool::admit`] takes them.
    pub fn cached_prefix(&self, hashes: &[BlockHash], tokens: &[u32]) -> Vec<u32> {
        if !self.caching {
            return Vec::new();
        }
        (0..hashes.len())
            .map_while(|i| self.cached_block(hashes, tokens, i))
            .collect()
    }

    /// The cached block named `hashes[i]`, block `i` of `tokens`, checked against its
    /// tokens and its parent's name.
    fn cached_block(&self, hashes: &[BlockHash], tokens: &[u32], i: usize) -> Option<u32> {
        let b = *self.by_hash.get(&hashes[i])?;
        let span = &tokens[i * self.block_size..(i + 1) * self.block_size];
        let parent = i.checked_sub(1).map(|p| hashes[p]);
        match &self.blocks[b as usize].name {
            Some(n) if n.hash == hashes[i] && n.parent == parent && *n.tokens == *span => Some(b),
            _ => None,
        }
    }

    /// A window layers' pool's share of a hit on the first `hashes.len()` blocks of
    /// `tokens`: [`HOLE`]s up to block `from`, then the cached blocks from there on (the
    /// window the next position reads), or `None` when one of those is not cached.
    pub fn cached_window(
        &self,
        hashes: &[BlockHash],
        tokens: &[u32],
        from: usize,
    ) -> Option<Vec<u32>> {
        let mut found = vec![HOLE; from];
        for i in from..hashes.len() {
            found.push(self.cached_block(hashes, tokens, i)?);
        }
        Some(found)
    }

    /// Whether [`BlockPool::admit`] of `cached` and `slots` would succeed.
    pub fn fits(&self, cached: &[u32], slots: usize) -> bool {
        let fresh = slots.div_ceil(self.block_size).saturating_sub(cached.len());
        // Cached blocks nobody holds are counted free: taking them uses up free blocks.
        let revived = cached
            .iter()
            .filter(|&&b| b != HOLE && self.blocks[b as usize].refs == 0)
            .count();
        fresh + revived <= self.num_free()
    }

    /// Gives `id` (which holds no blocks) the cached blocks `cached` (from
    /// [`BlockPool::cached_prefix`] or [`BlockPool::cached_window`]) and fresh ones up to
    /// `slots` positions. All or nothing: false, with nothing taken, when too few blocks
    /// are free.
    pub fn admit(&mut self, id: RequestId, cached: &[u32], slots: usize) -> bool {
        debug_assert!(
            !self.tables.contains_key(&id),
            "request {id} admitted twice"
        );
        if !self.fits(cached, slots) {
            return false;
        }
        let fresh = slots.div_ceil(self.block_size).saturating_sub(cached.len());
        for &b in cached.iter().filter(|&&b| b != HOLE) {
            if self.blocks[b as usize].refs == 0 {
                self.unlink(b);
            }
            self.blocks[b as usize].refs += 1;
        }
        let mut blocks = cached.to_vec();
        blocks.extend((0..fresh).map(|_| self.take()));
        let named = cached.len();
        let holes = cached.iter().take_while(|&&b| b == HOLE).count();
        self.tables.insert(
            id,
            Table {
                blocks,
                holes,
                named,
            },
        );
        true
    }

    /// Grows `id`'s table to cover `slots` positions. All or nothing: false, with nothing
    /// taken, when too few blocks are free.
    pub fn reserve(&mut self, id: RequestId, slots: usize) -> bool {
        let have = self.tables.get(&id).map_or(0, |t| t.blocks.len());
        let need = slots.div_ceil(self.block_size).saturating_sub(have);
        if need > self.num_free() {
            return false;
        }
        if need > 0 {
            let fresh: Vec<u32> = (0..need).map(|_| self.take()).collect();
            self.tables.entry(id).or_default().blocks.extend(fresh);
        }
        true
    }

    /// Names `id`'s blocks that are now full: the first `computed` positions of `tokens`
    /// are cached, and `hashes` names (at least) their full blocks. A block whose name
    /// another block already has stays unnamed (two sequences computed the same prefix at
    /// once; the other copy serves later hits).
    pub fn name_full_blocks(
        &mut self,
        id: RequestId,
        hashes: &[BlockHash],
        tokens: &[u32],
        computed: usize,
    ) {
        if !self.caching {
            return;
        }
        let Some(table) = self.tables.get_mut(&id) else {
            return;
        };
        let full = (computed / self.block_size)
            .min(table.blocks.len())
            .min(hashes.len());
        for i in table.named..full {
            let b = table.blocks[i];
            if b == HOLE {
                continue;
            }
            let block = &mut self.blocks[b as usize];
            if block.name.is_some() || self.by_hash.contains_key(&hashes[i]) {
                continue;
            }
            self.by_hash.insert(hashes[i], b);
            block.name = Some(Name {
                hash: hashes[i],
                parent: i.checked_sub(1).map(|p| hashes[p]),
                tokens: tokens[i * self.block_size..(i + 1) * self.block_size].into(),
            });
        }
        table.named = table.named.max(full);
    }

    /// Gives back every block of `id` (nothing if it holds none). Named blocks nobody holds
    /// stay cached; a sequence's last blocks are freed first, so that they are evicted
    /// before its first ones (a shared prefix is likelier to be asked for again).
    pub fn release(&mut self, id: RequestId) {
        let Some(table) = self.tables.remove(&id) else {
            return;
        };
        for &b in table.blocks.iter().rev() {
            self.unref(b, false);
        }
    }

    /// Gives back `id`'s first `n` blocks, which leave [`HOLE`]s in its table (window
    /// layers: positions no query of the sequence reads again). Those from index `forget`
    /// on (a sequence's generated positions, where later prompts seldom hit) lose their
    /// names once nobody holds them, so that the sequence's next block reuses one of them
    /// (whose memory is resident) rather than evicting a cached one.
    pub fn release_before(&mut self, id: RequestId, n: usize, forget: usize) {
        let Some(table) = self.tables.get_mut(&id) else {
            return;
        };
        let (from, n) = (table.holes, n.min(table.blocks.len()));
        if n <= from {
            return;
        }
        table.holes = n;
        let gone: Vec<u32> = table.blocks[from..n]
            .iter_mut()
            .map(|b| std::mem::replace(b, HOLE))
            .collect();
        for (i, b) in (from..).zip(gone) {
            self.unref(b, i >= forget);
        }
    }

    /// Drops a table's hold on `b` (nothing for a [`HOLE`]): a block nobody holds is free,
    /// cached if named and not to be forgotten.
    fn unref(&mut self, b: u32, forget: bool) {
        if b == HOLE {
            return;
        }
        let block = &mut self.blocks[b as usize];
        block.refs -= 1;
        if block.refs > 0 {
            return;
        }
        if forget {
            if let Some(name) = block.name.take() {
                self.by_hash.remove(&name.hash);
            }
        }
        if self.blocks[b as usize].name.is_some() {
            self.push_back(b);
        } else {
            self.empty.push(b);
        }
    }

    pub fn table(&self, id: RequestId) -> &[u32] {
        self.tables.get(&id).map_or(&[], |t| t.blocks.as_slice())
    }

    /// A free block for a table: an empty one, else the least recently freed cached one,
    /// evicted. The caller has checked that one is free.
    fn take(&mut self) -> u32 {
        let b = if let Some(b) = self.empty.pop() {
            b
        } else {
            let b = self.head;
            assert!(b != NIL, "no free block to take");
            self.unlink(b);
            if let Some(name) = self.blocks[b as usize].name.take() {
                self.by_hash.remove(&name.hash);
            }
            b
        };
        self.blocks[b as usize].refs = 1;
        b
    }

    /// Appends free cached block `b` to the list (most recently freed).
    fn push_back(&mut self, b: u32) {
        let tail = self.tail;
        let block = &mut self.blocks[b as usize];
        (block.prev, block.next) = (tail, NIL);
        if tail == NIL {
            self.head = b;
        } else {
            self.blocks[tail as usize].next = b;
        }
        self.tail = b;
        self.num_cached_free += 1;
    }

    /// Takes free cached block `b` out of the list.
    fn unlink(&mut self, b: u32) {
        let (prev, next) = {
            let block = &mut self.blocks[b as usize];
            let links = (block.prev, block.next);
            (block.prev, block.next) = (NIL, NIL);
            links
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.num_cached_free -= 1;
    }

    /// Checks the pool's invariants: each block's count is the tables holding it; a block
    /// nobody holds is free exactly once (empty, or in the list if and only if named); the
    /// names and the hash map agree; the list runs both ways.
    #[cfg(test)]
    pub fn check(&self) {
        let mut refs = vec![0u32; self.blocks.len()];
        for t in self.tables.values() {
            assert!(t.named <= t.blocks.len());
            let holes = t.blocks.iter().take_while(|&&b| b == HOLE).count();
            assert_eq!(holes, t.holes, "holes miscounted");
            for &b in &t.blocks[holes..] {
                assert!(b != HOLE, "a hole after a block");
                refs[b as usize] += 1;
            }
        }
        let mut free = vec![0u32; self.blocks.len()];
        for &b in &self.empty {
            assert!(
                self.blocks[b as usize].name.is_none(),
                "empty block {b} named"
            );
            free[b as usize] += 1;
        }
        let (mut b, mut prev, mut listed) = (self.head, NIL, 0);
        while b != NIL {
            let block = &self.blocks[b as usize];
            assert_eq!(block.prev, prev, "list broken at {b}");
            assert!(block.name.is_some(), "unnamed block {b} in the cached list");
            free[b as usize] += 1;
            (prev, b, listed) = (b, block.next, listed + 1);
        }
        assert_eq!((self.tail, listed), (prev, self.num_cached_free));
        for (i, block) in self.blocks.iter().enumerate() {
            assert_eq!(block.refs, refs[i], "block {i}'s count");
            let want = u32::from(refs[i] == 0);
            assert_eq!(free[i], want, "block {i} free {} times", free[i]);
            if let Some(n) = &block.name {
                assert_eq!(self.by_hash.get(&n.hash), Some(&(i as u32)));
            }
        }
        for (&hash, &b) in &self.by_hash {
            assert!(self.blocks[b as usize]
                .name
                .as_ref()
                .is_some_and(|n| n.hash == hash));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, Result};

    #[test]
    fn reserve_is_all_or_nothing_and_release_returns_every_block() -> Result<()> {
        let mut pool = BlockPool::new(4, 16, true);
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

    /// The chained hashes of `tokens`' full blocks of 4.
    fn hashes(tokens: &[u32]) -> Vec<BlockHash> {
        let mut out = Vec::new();
        extend_hashes(&mut out, tokens, 4, tokens.len() / 4);
        out
    }

    /// A sequence's full blocks are shared with a later one that begins the same way;
    /// after both are gone they stay cached until blocks are needed, and then the least
    /// recently freed (a sequence's tail first) go.
    #[test]
    fn full_blocks_are_shared_and_evicted_least_recently_freed_first() {
        let mut pool = BlockPool::new(6, 4, true);
        let a: Vec<u32> = (0..10).collect(); // two full blocks and a partial one
        let ha = hashes(&a);
        assert!(pool.admit(1, &[], 10));
        pool.name_full_blocks(1, &ha, &a, 10);
        assert_eq!(pool.num_cached(), 2);
        // Same first block, different second one: one block shared.
        let mut b = a.clone();
        b[5] = 99;
        let hb = hashes(&b);
        let hit = pool.cached_prefix(&hb, &b);
        assert_eq!(hit, pool.table(1)[..1]);
        assert!(pool.admit(2, &hit, 10));
        pool.name_full_blocks(2, &hb, &b, 8);
        assert_eq!((pool.num_free(), pool.num_cached()), (1, 3));
        pool.check();
        // A false name (a collision) is never taken: the tokens are compared too.
        let mut c = a.clone();
        c[0] = 7;
        assert!(pool.cached_prefix(&ha, &c).is_empty());
        pool.release(1);
        pool.release(2);
        assert_eq!((pool.num_free(), pool.num_cached()), (6, 3));
        pool.check();
        // Everything comes back from the cache without a fresh block.
        let hit = pool.cached_prefix(&ha, &a);
        assert_eq!(hit.len(), 2);
        assert!(pool.admit(3, &hit, 8));
        assert_eq!(pool.table(3), hit);
        pool.release(3);
        // Six blocks wanted: the three empty ones, then the cached ones evicted in the
        // order they were freed (request 3's tail before its head).
        assert!(pool.reserve(4, 24));
        let order = pool.table(4);
        let pos = |b: u32| order.iter().position(|&x| x == b).unwrap();
        assert!(pos(hit[1]) < pos(hit[0]));
        assert_eq!(pool.num_cached(), 0);
        pool.check();
        pool.release(4);
        pool.check();
    }

    /// Cached blocks nobody holds count as free, and reviving them uses them up.
    #[test]
    fn admitting_counts_revived_blocks_against_the_free_ones() {
        let mut pool = BlockPool::new(3, 4, true);
        let a: Vec<u32> = (0..8).collect();
        let ha = hashes(&a);
        assert!(pool.admit(1, &[], 8));
        pool.name_full_blocks(1, &ha, &a, 8);
        pool.release(1);
        assert_eq!(pool.num_free(), 3);
        let hit = pool.cached_prefix(&ha, &a);
        // Two revived and two fresh: four from three.
        assert!(!pool.admit(2, &hit, 16));
        pool.check();
        assert!(pool.admit(2, &hit, 12));
        assert_eq!(pool.num_free(), 0);
        pool.check();
    }

    /// Window layers: blocks out of a sequence's window go back (named ones to the cache),
    /// leaving holes; a later sequence finds the window before its hit, and only if every
    /// block of it is cached.
    #[test]
    fn windows_give_back_their_first_blocks_and_find_them_again() {
        let mut pool = BlockPool::new(6, 4, true);
        let a: Vec<u32> = (0..16).collect();
        let ha = hashes(&a);
        assert!(pool.admit(1, &[], 16));
        pool.name_full_blocks(1, &ha, &a, 16);
        let table = pool.table(1).to_vec();
        pool.release_before(1, 2, 4);
        assert_eq!(pool.table(1)[..2], [HOLE, HOLE]);
        assert_eq!(pool.table(1)[2..], table[2..]);
        assert_eq!((pool.num_free(), pool.num_cached()), (4, 4));
        pool.release_before(1, 1, 4); // already gone: nothing changes
        pool.check();
        // A hit on the first three blocks needs blocks 1 and 2 (from 1 on).
        let found = pool.cached_window(&ha[..3], &a, 1);
        assert_eq!(found, Some(vec![HOLE, table[1], table[2]]));
        assert!(pool.fits(&[HOLE, table[1], table[2]], 16));
        assert!(pool.admit(2, &[HOLE, table[1], table[2]], 16));
        assert_eq!(pool.table(2)[..3], [HOLE, table[1], table[2]]);
        assert_eq!(pool.num_free(), 2); // block 0 cached, one fresh for request 2
        pool.check();
        // Block 0 evicted: a window that needs it is not found.
        pool.release(2);
        pool.release(1);
        assert!(pool.reserve(3, 24));
        assert_eq!(pool.cached_window(&ha[..3], &a, 0), None);
        pool.release(3);
        pool.check();
        // Generated positions (from block 1 on, here) are forgotten as they leave; a block
        // another table still holds keeps its name.
        assert!(pool.admit(4, &[], 16));
        pool.name_full_blocks(4, &ha, &a, 16);
        let shared = pool.cached_prefix(&ha[..3], &a);
        assert!(pool.admit(5, &shared, 12));
        pool.release_before(4, 3, 1);
        assert_eq!(pool.num_cached(), 4); // blocks 1 and 2 held by request 5
        pool.release(5);
        pool.release_before(4, 4, 1);
        assert_eq!(pool.num_cached(), 3);
        assert_eq!(pool.cached_prefix(&ha, &a).len(), 3);
        pool.release(4);
        pool.check();
    }

    #[test]
    fn without_caching_nothing_is_named() {
        let mut pool = BlockPool::new(3, 4, false);
        let a: Vec<u32> = (0..8).collect();
        let ha = hashes(&a);
        assert!(pool.admit(1, &[], 8));
        pool.name_full_blocks(1, &ha, &a, 8);
        assert_eq!(pool.num_cached(), 0);
        assert!(pool.cached_prefix(&ha, &a).is_empty());
        pool.release(1);
        pool.check();
    }
}
