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
