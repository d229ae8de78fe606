//! The scheduler: FIFO admission, a token budget per step, and preemption.
//!
//! Each step, running requests (oldest first) get the tokens they still need — one for a
//! decode, a chunk of the prompt while prefilling — within the step's token budget; then
//! waiting requests are admitted, in order, while the budget, the batch size and the free
//! blocks allow. Prefill chunks and decode tokens share one forward pass. When a running
//! request needs a block and none is free, the newest running request is preempted: its
//! blocks are freed and it goes back to the front of the queue, to be recomputed later
//! (vLLM's recompute preemption). The oldest request can therefore always proceed, and as
//! no request may hold more positions than the pool (see `Request::max_len`), nothing
//! waits forever.

use std::collections::VecDeque;

use crate::model::attention::Ring;

use super::kv_cache::BlockPool;
use super::request::{Request, RequestId, RequestState};

#[derive(Debug)]
pub struct Scheduler {
    pub waiting: VecDeque<Request>,
    /// Admitted requests, oldest first.
    pub running: Vec<Request>,
    pub pool: BlockPool,
    ring: Option<Ring>,
    max_batch_size: usize,
    token_budget: usize,
    pub preemptions: u64,
}

/// Work for one step: `(request id, tokens to compute)`, in `running` order.
pub type Plan = Vec<(RequestId, usize)>;

impl Scheduler {
    pub fn new(
        pool: BlockPool,
        ring: Option<Ring>,
        max_batch_size: usize,
        token_budget: usize,
    ) -> Self {
        Scheduler {
            waiting: VecDeque::new(),
            running: Vec::new(),
            pool,
            ring,
            max_batch_size,
            token_budget,
            preemptions: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn add(&mut self, request: Request) {
        self.waiting.push_back(request);
    }

    /// Decides the next step; the caller then runs it and reports back with
    /// [`Scheduler::computed`].
    pub fn schedule(&mut self) -> Plan {
        let mut budget = self.token_budget;
        let mut plan = Plan::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let request = &self.running[i];
            let n = request.pending().min(budget);
            let slots = Ring::slots(self.ring, request.computed + n);
            if self.pool.reserve(request.id, slots) {
                plan.push((request.id, n));
                budget -= n;
                i += 1;
                continue;
            }
            // Out of blocks: preempt the newest request (perhaps this one) and retry.
            let victim = self.running.len() - 1;
            if victim == 0 {
                // Alone and still too big: only possible if a request outgrew the pool,
                // which `max_len` prevents. Leave it for the caller to fail.
                break;
            }
            self.preempt(victim);
        }
        while budget > 0 && self.running.len() < self.max_batch_size {
            let Some(request) = self.waiting.front() else {
                break;
            };
            let n = request.pending().min(budget);
            let slots = Ring::slots(self.ring, request.computed + n);
            if !self.pool.reserve(request.id, slots) {
                break; // FIFO: nobody overtakes the head of the queue.
            }
            let Some(mut request) = self.waiting.pop_front() else {
                break;
            };
            request.state = RequestState::Prefilling;
            plan.push((request.id, n));
            budget -= n;
            self.running.push(request);
        }
        plan
    }

    fn preempt(&mut self, index: usize) {
        let mut request = self.running.remove(index);
        self.pool.release(request.id);
        request.computed = 0;
        request.state = RequestState::Waiting;
        self.preemptions += 1;
        self.waiting.push_front(request);
    }

    /// Records that the plan ran: each request's tokens are now cached.
    pub fn computed(&mut self, plan: &Plan) {
        for &(id, n) in plan {
            if let Some(r) = self.running.iter_mut().find(|r| r.id == id) {
                r.computed += n;
            }
        }
    }

    /// Removes finished and failed requests from the batch and frees their blocks.
    pub fn retire(&mut self) -> Vec<Request> {
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(Request::is_finished);
        self.running = running;
        for r in &done {
            self.pool.release(r.id);
        }
        done
    }

    /// Takes request `id` out wherever it is, freeing its blocks.
    pub fn remove(&mut self, id: RequestId) -> Option<Request> {
        let request = if let Some(i) = self.running.iter().position(|r| r.id == id) {
            Some(self.running.remove(i))
        } else {
            let i = self.waiting.iter().position(|r| r.id == id)?;
            self.waiting.remove(i)
        };
        self.pool.release(id);
        request
    }

    /// Takes every request out and frees all blocks (shutdown, or recovery after a fault).
    pub fn drain(&mut self) -> Vec<Request> {
        let mut all: Vec<Request> = self.running.drain(..).collect();
        all.extend(self.waiting.drain(..));
        for r in &all {
            self.pool.release(r.id);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::engine::request::FinishReason;
    use crate::engine::sampling::SamplingParams;
    use crate::tokenizer::Tokenizer;

    const VOCAB: usize = 8;

    /// A word-level tokenizer of `VOCAB` words, built once for every test of the module.
    fn tokenizer() -> Arc<Tokenizer> {
        static TOKENIZER: std::sync::OnceLock<Arc<Tokenizer>> = std::sync::OnceLock::new();
        TOKENIZER.get_or_init(build_tokenizer).clone()
    }

    fn build_tokenizer() -> Arc<Tokenizer> {
        let vocab: Vec<String> = (0..VOCAB).map(|i| format!("\"w{i}\": {i}")).collect();
        let json = format!(
            r#"{{"version": "1.0", "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null, "decoder": null,
            "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "w0"}}}}"#,
            vocab.join(", ")
        );
        let dir = std::env::temp_dir().join(format!("cortex-sched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), json).unwrap();
        Arc::new(Tokenizer::from_dir(&dir).unwrap())
    }

    /// One simulated workload: `(prompt length, max_tokens, step at which it is aborted)`.
    fn run(
        requests: Vec<(usize, usize, Option<usize>)>,
        num_blocks: usize,
        block_size: usize,
        ring: Option<Ring>,
    ) {
        let tok = tokenizer();
        let (tx, _rx) = mpsc::channel();
        let capacity = num_blocks * block_size;
        let mut s = Scheduler::new(BlockPool::new(num_blocks, block_size), ring, 4, 24);
        let mut aborts = Vec::new();
        for (id, &(prompt, max_tokens, abort)) in requests.iter().enumerate() {
            let params = SamplingParams {
                max_tokens,
                ..SamplingParams::default()
            };
            // As `Engine::submit` admits them: a prompt must fit the cache.
            let max_len = if ring.is_some() { usize::MAX } else { capacity };
            let prompt = (0..prompt.min(capacity - 1))
                .map(|t| (t % VOCAB) as u32)
                .collect();
            s.add(Request::new(
                id as u64,
                prompt,
                params,
                max_len,
                tok.clone(),
                tx.clone(),
            ));
            if let Some(step) = abort {
                aborts.push((step, id as u64));
            }
        }
        let mut logits = vec![0f32; VOCAB];
        logits[3] = 1.0;
        let mut done = 0;
        for step in 0..10_000 {
            for &(_, id) in aborts.iter().filter(|(at, _)| *at == step) {
                if s.remove(id).is_some() {
                    done += 1;
                }
            }
            if s.is_idle() {
                break;
            }
            let plan = s.schedule();
            assert!(!plan.is_empty(), "nothing scheduled: deadlock");
            s.pool.check();
            let total: usize = plan.iter().map(|&(_, n)| n).sum();
            assert!(total <= 24 && plan.len() <= 4);
            for &(id, n) in &plan {
                let r = s.running.iter().find(|r| r.id == id).unwrap();
                let need = Ring::slots(ring, r.computed + n).div_ceil(block_size);
                assert!(s.pool.table(id).len() >= need, "table of {id} too short");
            }
            s.computed(&plan);
            for r in s.running.iter_mut().filter(|r| r.pending() == 0) {
                r.sample(&logits).unwrap();
            }
            for r in s.retire() {
                assert!(matches!(
                    r.state,
                    RequestState::Finished(FinishReason::Length)
                ));
                assert!(r.generated() == r.params().max_tokens || r.tokens.len() > r.max_len);
                done += 1;
            }
            s.pool.check();
        }
        assert!(s.is_idle(), "requests left after the step limit");
        assert_eq!(done, requests.len());
        assert_eq!(s.pool.num_free(), num_blocks, "blocks leaked");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random workloads on a small cache: every request ends, the pool's invariant
        /// holds after each step, and every block comes back.
        #[test]
        fn block_accounting_holds(
            requests in prop::collection::vec((1usize..60, 1usize..40, prop::option::of(0usize..80)), 1..12),
            num_blocks in 4usize..24,
            block_size in prop::sample::select(vec![1usize, 4, 16]),
        ) {
            run(requests, num_blocks, block_size, None);
        }

        #[test]
        fn block_accounting_holds_with_a_ring(
            requests in prop::collection::vec((1usize..60, 1usize..40, prop::option::of(0usize..80)), 1..12),
            window in 2usize..20,
        ) {
            let ring = Ring { keep: 4, window };
            run(requests, 8, 4, Some(ring));
        }
    }
}
