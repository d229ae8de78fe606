//! The scheduler: FIFO admission, a token budget per step, and preemption; the first and
//! last thirds of a step (vLLM's `Scheduler.schedule` and `update_from_output`).
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
//!
//! The scheduler decides and never touches tensors: [`Scheduler::schedule`] hands the
//! runner a [`SchedulerOutput`] (plain token spans and block tables), and
//! [`Scheduler::update_from_output`] takes back one row of logits per sampled sequence.
//! Cost per step: O(running + admitted) plus the blocks reserved (O(1) each).

use std::collections::VecDeque;
use std::time::Instant;

use parking_lot::Mutex;

use crate::error::{bail, Error, Result};
use crate::model::{Draw, Logits};

use super::kv::{dead_blocks, extend_hashes, BlockPool, Ring, HOLE};
use super::request::{Event, FinishReason, Request, RequestId, RequestState, Row};
use super::stats::Stats;

#[derive(Debug)]
pub struct Scheduler {
    /// Submitted or preempted requests, in admission order; they hold no blocks.
    waiting: VecDeque<Request>,
    /// Admitted requests, oldest first.
    running: Vec<Request>,
    pool: BlockPool,
    /// The window layers' blocks, if the model has layers that keep only their window.
    windows: Option<Windows>,
    ring: Option<Ring>,
    max_batch_size: usize,
    token_budget: usize,
    /// Most draft tokens a decoding request carries; 0: no speculation.
    speculative_tokens: usize,
    /// Drafts come from a draft model ([`Scheduler::draft`]), not prompt lookup.
    draft_model: bool,
    preemptions: u64,
    /// Tokens of admitted requests looked up in the prefix cache, and those found.
    prefix_queries: u64,
    prefix_hits: u64,
}

/// The blocks of the layers that keep only their window (see [`super::kv::WindowLayers`]):
/// a pool of their own, with the same block size and names as the main one.
#[derive(Debug)]
pub struct Windows {
    pub pool: BlockPool,
    /// Positions each query of those layers attends to.
    pub window: usize,
}

impl Windows {
    /// A sequence's blocks that no query at `computed` or later reads.
    fn dead_blocks(&self, computed: usize) -> usize {
        dead_blocks(self.window, self.pool.block_size(), computed)
    }
}

/// One sequence's share of a step, all the runner needs to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: RequestId,
    /// Positions `start..start + tokens.len()` of the sequence, to run now.
    pub tokens: Vec<u32>,
    /// Positions before `start` are already cached.
    pub start: usize,
    /// The sequence's block table, covering every slot of the span.
    pub blocks: Vec<u32>,
    /// Its window layers' table (empty without them): [`HOLE`]s, then blocks covering
    /// every position the span reads or writes.
    pub window_blocks: Vec<u32>,
    /// The span ends at the newest token: its logits are sampled.
    pub sample: bool,
    /// How a pass may draw the span's token where its logits are, when that is all the
    /// request takes ([`Request::device_draw`]; `None` for a span that does not sample).
    pub draw: Option<Draw>,
    /// The span's last `drafts` tokens are proposed, not yet accepted (speculative
    /// decoding): logits come back for each of them and for the position before.
    pub drafts: usize,
    /// Draft tokens a draft model is to propose for the span before it runs (their slots
    /// are reserved): [`Scheduler::draft`] appends them to `tokens` as drafts.
    pub propose: usize,
}

impl ScheduledSeq {
    /// The proposed tokens the span ends in.
    pub fn draft_tokens(&self) -> &[u32] {
        &self.tokens[self.tokens.len() - self.drafts..]
    }
}

/// What one step runs (vLLM's `SchedulerOutput`): the scheduled spans, in `running` order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    pub seqs: Vec<ScheduledSeq>,
    /// Prompt tokens (or recomputed ones) in the step, for the statistics.
    pub prompt_tokens: usize,
}

impl SchedulerOutput {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Rows of logits the step must produce: one per sampled sequence, and one more per
    /// draft token.
    pub fn num_rows(&self) -> usize {
        self.seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| 1 + s.drafts)
            .sum()
    }
}

impl Scheduler {
    pub fn new(
        pool: BlockPool,
        windows: Option<Windows>,
        ring: Option<Ring>,
        max_batch_size: usize,
        token_budget: usize,
        speculative_tokens: usize,
        draft_model: bool,
    ) -> Self {
        Scheduler {
            waiting: VecDeque::new(),
            running: Vec::new(),
            pool,
            windows,
            ring,
            max_batch_size,
            token_budget,
            speculative_tokens,
            draft_model,
            preemptions: 0,
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// `(free, total)` blocks of the window layers' pool, if there is one.
    pub fn window_blocks(&self) -> Option<(usize, usize)> {
        (self.windows.as_ref()).map(|w| (w.pool.num_free(), w.pool.num_blocks()))
    }

    /// Requests preempted (and later recomputed) so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// `(tokens looked up, tokens found, blocks cached now)` of the prefix cache.
    pub fn prefix_cache(&self) -> (u64, u64, usize) {
        (
            self.prefix_queries,
            self.prefix_hits,
            self.pool.num_cached(),
        )
    }

    /// Queues a request behind every waiting one (called when it is submitted).
    pub fn add(&mut self, request: Request) {
        self.waiting.push_back(request);
    }

    /// Decides the next step, at its start (`now`): reserves the blocks every scheduled span
    /// needs and describes the spans. The caller runs them, then reports back with
    /// [`Scheduler::update_from_output`] before scheduling again. Empty when nothing can
    /// run (see [`Scheduler::fail_unschedulable`]).
    pub fn schedule(&mut self, now: Instant) -> SchedulerOutput {
        let mut budget = self.token_budget;
        let mut out = SchedulerOutput::default();
        let prefilling =
            self.speculative_tokens > 0 && self.running.iter().any(|r| r.pending() > 1);
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let request = &self.running[i];
            if let Some(w) = &mut self.windows {
                // No query from here on reads these (a rejected draft rolls back no
                // further than this step's start). One more block is kept, so that when
                // the sequence ends the window before its last full block stays cached
                // (a follow-up turn hits there); generated positions are forgotten.
                let gone = w.dead_blocks(request.computed).saturating_sub(1);
                let forget = request.prompt_len / w.pool.block_size();
                w.pool.release_before(request.id, gone, forget);
            }
            // Drafts ride along only while blocks are plentiful: no running request
            // prefills (a chunk may need many), and more are free than the decoding
            // requests still to schedule (one each at most), so that drafts never cause a
            // preemption.
            let plentiful = !prefilling && self.pool.num_free() > self.running.len() - i + 1;
            let room = if plentiful {
                self.draft_room(request, budget)
            } else {
                0
            };
            // Prompt lookup proposes now; a draft model once the step is decided.
            let (drafts, propose) = match room {
                0 => (Vec::new(), 0),
                _ if self.draft_model => (Vec::new(), room),
                _ => (request.propose(room), 0),
            };
            let extra = drafts.len() + propose;
            let (len, n) = (request.tokens.len(), request.pending().min(budget));
            let computed = request.computed;
            if extra > 0 && self.reserve(i, len + extra) {
                budget -= 1 + extra;
                self.push_span(&mut out, i, 1, (drafts, propose), now);
                i += 1;
                continue;
            }
            if self.reserve(i, computed + n) {
                budget -= n;
                self.push_span(&mut out, i, n, (Vec::new(), 0), now);
                i += 1;
                continue;
            }
            // Out of blocks: preempt the newest request (perhaps this one, never one
            // already scheduled, which are older) and retry.
            let victim = self.running.len() - 1;
            if victim == 0 {
                // Alone and still too big: only possible if a request outgrew the pool,
                // which `max_len` prevents. Leave it for the caller to fail.
                break;
            }
            self.preempt(victim);
        }
        while budget > 0 && self.running.len() < self.max_batch_size {
            let Some(request) = self.waiting.front_mut() else {
                break;
            };
            // Its longest cached prefix of full blocks, short of the last token (whose
            // logits the step must compute).
            let mut cached = if self.pool.caching() {
                let len = request.tokens.len();
                let n = request.hash_blocks(self.pool.block_size(), len - 1);
                self.pool
                    .cached_prefix(&request.block_hashes[..n], &request.tokens)
            } else {
                Vec::new()
            };
            // Window layers need the window before the hit cached too: the longest hit
            // that has it (none at all always does).
            let mut window_cached = Vec::new();
            if let Some(w) = &self.windows {
                let size = self.pool.block_size();
                while let Some(h) = (!cached.is_empty()).then_some(cached.len()) {
                    let hashes = &request.block_hashes[..h];
                    let from = w.dead_blocks(h * size);
                    if let Some(found) = w.pool.cached_window(hashes, &request.tokens, from) {
                        window_cached = found;
                        break;
                    }
                    cached.pop();
                }
            }
            let computed = cached.len() * self.pool.block_size();
            let n = (request.tokens.len() - computed).min(budget);
            let slots = Ring::slots(self.ring, computed + n);
            let fits = |w: &Windows| w.pool.fits(&window_cached, computed + n);
            if !self.pool.fits(&cached, slots) || !self.windows.as_ref().is_none_or(fits) {
                break; // FIFO: nobody overtakes the head of the queue.
            }
            self.pool.admit(request.id, &cached, slots);
            if let Some(w) = &mut self.windows {
                w.pool.admit(request.id, &window_cached, computed + n);
            }
            let Some(mut request) = self.waiting.pop_front() else {
                break;
            };
            if self.pool.caching() {
                self.prefix_queries += request.tokens.len() as u64;
                self.prefix_hits += computed as u64;
            }
            request.computed = computed;
            // Cached blocks hold the draft model's keys and values too (see `draft`).
            request.draft_computed = computed;
            request.state = RequestState::Prefilling;
            budget -= n;
            self.running.push(request);
            self.push_span(&mut out, self.running.len() - 1, n, (Vec::new(), 0), now);
        }
        out
    }

    /// Grows `running[index]`'s tables to cover its first `len` positions; false when too
    /// few blocks are free (what the main pool took then stays, for later steps).
    fn reserve(&mut self, index: usize, len: usize) -> bool {
        let id = self.running[index].id;
        self.pool.reserve(id, Ring::slots(self.ring, len))
            && (self.windows.as_mut()).is_none_or(|w| w.pool.reserve(id, len))
    }

    /// Gives back every block of request `id`.
    fn release(&mut self, id: RequestId) {
        self.pool.release(id);
        if let Some(w) = &mut self.windows {
            w.pool.release(id);
        }
    }

    /// How many draft tokens a decoding `request` may carry this step: what the budget,
    /// `max_tokens` and the sequence's room allow. None for a constrained request (its
    /// mask covers one position), and none that would wrap a rotating cache (a rejected
    /// draft would have overwritten a position still in the window).
    fn draft_room(&self, request: &Request, budget: usize) -> usize {
        if self.speculative_tokens == 0
            || request.state != RequestState::Decoding
            || request.pending() != 1
            || request.is_constrained()
        {
            return 0;
        }
        let len = request.tokens.len();
        let mut room = (self.speculative_tokens)
            .min(budget - 1)
            .min(
                request
                    .params()
                    .max_tokens
                    .saturating_sub(request.generated() + 1),
            )
            .min(request.max_len.saturating_sub(len));
        if let Some(ring) = self.ring {
            room = room.min((ring.keep + ring.window).saturating_sub(len));
        }
        room
    }

    /// Adds the next `n` tokens of `running[index]`, then `drafts`, to `out`, with
    /// `propose` more drafts to come from the draft model (their blocks are reserved).
    fn push_span(
        &mut self,
        out: &mut SchedulerOutput,
        index: usize,
        n: usize,
        (drafts, propose): (Vec<u32>, usize),
        now: Instant,
    ) {
        let r = &mut self.running[index];
        r.first_scheduled.get_or_insert(now);
        let end = r.computed + n;
        if n > 1 || r.state == RequestState::Prefilling {
            out.prompt_tokens += n;
        }
        let mut tokens = r.tokens[r.computed..end].to_vec();
        let num_drafts = drafts.len();
        tokens.extend(drafts);
        out.seqs.push(ScheduledSeq {
            id: r.id,
            tokens,
            start: r.computed,
            blocks: self.pool.table(r.id).to_vec(),
            window_blocks: (self.windows.as_ref())
                .map_or(Vec::new(), |w| w.pool.table(r.id).to_vec()),
            sample: end == r.tokens.len(),
            draw: (end == r.tokens.len())
                .then(|| r.device_draw(num_drafts, self.draft_model))
                .flatten(),
            drafts: num_drafts,
            propose,
        });
    }

    /// Runs the draft model over a decided step (speculative decoding with a draft model):
    /// `run` executes spans on it and returns their sampled rows' logits. The first pass
    /// catches the draft model's cache up with every span (what the target model has
    /// cached and the span's new tokens: its whole prefill, and after a decode step the
    /// accepted tokens), and proposes each span's first draft; each further pass feeds
    /// the latest draft and proposes the next. The drafts are then appended to their
    /// spans. A sampled request also takes the draft model's distribution for every token
    /// it samples (see [`Request::draws_by_verifying`]): at the end of a plain decode
    /// step, and one past its last draft. The draft model writes its keys and values into
    /// the same blocks as the target (its own cache, the same block tables), so
    /// prefix-cache hits and preemptions keep both in step.
    pub fn draft(
        &mut self,
        output: &mut SchedulerOutput,
        mut run: impl FnMut(&SchedulerOutput) -> Result<Logits>,
    ) -> Result<()> {
        // Spans follow `running` order: one pass finds each span's request. With it, the
        // passes after the first that the span takes part in.
        let mut at = Vec::with_capacity(output.seqs.len());
        let mut next = 0;
        for seq in &output.seqs {
            let Some(i) = (next..self.running.len()).find(|&i| self.running[i].id == seq.id) else {
                bail!(Internal, "scheduled request {} is not running", seq.id);
            };
            let r = &self.running[i];
            if r.draft_computed > seq.start {
                bail!(Internal, "the draft model is ahead of request {}", seq.id);
            }
            let passes = match seq.propose {
                0 => 0,
                k if r.draws_by_verifying() => k,
                k => k - 1,
            };
            at.push((i, passes));
            next = i + 1;
        }
        let most = at.iter().map(|a| a.1).max().unwrap_or(0);
        for pass in 0..=most {
            let mut spans = SchedulerOutput::default();
            // The requests of `spans`, and (with their span's index in `output`) those
            // that propose (sample) in this pass.
            let (mut members, mut proposing) = (Vec::new(), Vec::new());
            for (k, (seq, &(i, passes))) in output.seqs.iter().zip(&at).enumerate() {
                let r = &self.running[i];
                let (tokens, sample) = if pass == 0 {
                    // The tokens the target runs this step (`drafts` is 0: no proposal
                    // yet), and any it ran before that the draft model did not.
                    let tokens = r.tokens[r.draft_computed..seq.start + seq.tokens.len()].to_vec();
                    let sample = seq.propose > 0 || (seq.sample && r.draws_by_verifying());
                    (tokens, sample)
                } else if passes >= pass {
                    (r.proposed().last().into_iter().collect(), true)
                } else {
                    continue;
                };
                if sample {
                    proposing.push((k, i));
                }
                members.push(i);
                spans.seqs.push(ScheduledSeq {
                    id: seq.id,
                    tokens,
                    start: r.draft_computed,
                    blocks: seq.blocks.clone(),
                    // The draft model's cache has no window layers (see `Engine::new`).
                    window_blocks: Vec::new(),
                    sample,
                    // A proposal is the argmax, or drawn (penalties counting the
                    // proposals so far) from a distribution the host keeps.
                    draw: r.params().is_plain_greedy().then(Draw::argmax),
                    drafts: 0,
                    propose: 0,
                });
            }
            let logits = run(&spans)?;
            if logits.rows() != proposing.len() {
                bail!(
                    Internal,
                    "{} rows of draft logits for {} expected",
                    logits.rows(),
                    proposing.len()
                );
            }
            for (span, &i) in spans.seqs.iter().zip(&members) {
                self.running[i].draft_computed += span.tokens.len();
            }
            for (row, &(k, i)) in proposing.iter().enumerate() {
                if self.running[i].propose_draft(row_of(&logits, row)).is_err() {
                    // The draft model failed on this request alone (NaN logits): it
                    // decodes plainly this step, and the model judges its own logits.
                    self.running[i].drop_proposals();
                    at[k].1 = 0;
                    output.seqs[k].propose = 0;
                }
            }
        }
        for (seq, &(i, _)) in output.seqs.iter_mut().zip(&at) {
            if seq.propose > 0 {
                seq.tokens
                    .extend(self.running[i].proposed().take(seq.propose));
                seq.drafts = seq.propose;
                seq.propose = 0;
            }
        }
        Ok(())
    }

    fn preempt(&mut self, index: usize) {
        let mut request = self.running.remove(index);
        self.release(request.id);
        request.computed = 0;
        request.draft_computed = 0;
        request.state = RequestState::Waiting;
        self.preemptions += 1;
        self.waiting.push_front(request);
    }

    /// The cached blocks of all of `tokens`' full blocks (a prefix to save) and the window
    /// layers' (the window before its end, [`HOLE`]s before that), `None` when some are
    /// not in the cache.
    pub fn cached_blocks(&self, tokens: &[u32]) -> Option<(Vec<u32>, Vec<u32>)> {
        let size = self.pool.block_size();
        let mut hashes = Vec::new();
        extend_hashes(&mut hashes, tokens, size, tokens.len() / size);
        let found = self.pool.cached_prefix(&hashes, tokens);
        let window = match &self.windows {
            Some(w) => (w.pool).cached_window(&hashes, tokens, w.dead_blocks(tokens.len()))?,
            None => Vec::new(),
        };
        (found.len() == hashes.len()).then_some((found, window))
    }

    /// Puts the full blocks of `tokens` (a saved prefix being loaded) into the cache, as
    /// free cached blocks like any others: those not cached yet get blocks, which `fill`
    /// writes before they are named. `fill` gets the whole block table, the index of the
    /// first block to write (those before are cached already), and the window layers'
    /// blocks to write (empty without them; [`HOLE`] where there is nothing to write: out
    /// of the window before the prefix's end, or all cached already). Returns how many
    /// blocks were filled. Fails when running requests hold too many blocks.
    pub fn adopt(
        &mut self,
        tokens: &[u32],
        fill: impl FnOnce(&[u32], usize, &[u32]) -> Result<()>,
    ) -> Result<usize> {
        let size = self.pool.block_size();
        let n = tokens.len() / size;
        let mut hashes = Vec::new();
        extend_hashes(&mut hashes, tokens, size, n);
        let found = self.pool.cached_prefix(&hashes, tokens);
        // The window layers' part: all cached, or all written afresh.
        let window = (self.windows.as_ref()).map(|w| {
            let from = w.dead_blocks(tokens.len());
            match w.pool.cached_window(&hashes, tokens, from) {
                Some(all) => (all, true),
                None => (vec![HOLE; from], false),
            }
        });
        // Held as one pseudo-request while filled, so that nothing evicts the found part.
        let id = RequestId::MAX;
        let busy = |needed: usize, free: usize| {
            Error::Engine(format!(
                "the KV cache is busy: the prefix needs {needed} blocks and {free} are free"
            ))
        };
        if !self.pool.fits(&found, n * size) {
            return Err(busy(n - found.len(), self.pool.num_free()));
        }
        if let (Some(w), Some((cached, _))) = (&self.windows, &window) {
            if !w.pool.fits(cached, n * size) {
                return Err(busy(n - cached.len(), w.pool.num_free()));
            }
        }
        self.pool.admit(id, &found, n * size);
        let table = self.pool.table(id).to_vec();
        let mut window_fill = Vec::new();
        if let (Some(w), Some((cached, whole))) = (&mut self.windows, &window) {
            w.pool.admit(id, cached, n * size);
            window_fill = w.pool.table(id).to_vec();
            if *whole {
                window_fill.fill(HOLE);
            }
        }
        let filled = fill(&table, found.len(), &window_fill);
        if filled.is_ok() {
            (self.pool).name_full_blocks(id, &hashes, tokens, n * size);
            if let Some(w) = &mut self.windows {
                w.pool.name_full_blocks(id, &hashes, tokens, n * size);
            }
        }
        self.release(id);
        filled.map(|()| n - found.len())
    }

    /// The running requests this step samples whose output is held to a grammar: their
    /// masks can be computed while the forward pass runs.
    pub fn constrained(&mut self, output: &SchedulerOutput) -> Vec<&mut Request> {
        if !self.running.iter().any(Request::is_constrained) {
            return Vec::new();
        }
        let sampled: Vec<_> = output
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| s.id)
            .collect();
        self.running
            .iter_mut()
            .filter(|r| r.is_constrained() && sampled.contains(&r.id))
            .collect()
    }

    /// Takes back what the runner computed for `output` (the last third of a step): every
    /// span is now cached; each sampled sequence draws its next token from its row of
    /// `logits` (`[output.num_rows()][vocab]`, in `output` order; a span with drafts has a
    /// row for each and draws until one is rejected), and its caller gets the events.
    /// Returns the requests that ended, whose blocks are free again.
    pub fn update_from_output(
        &mut self,
        output: &SchedulerOutput,
        logits: &Logits,
        stats: &Mutex<Stats>,
    ) -> Result<Vec<Request>> {
        if logits.rows() != output.num_rows() {
            bail!(
                Internal,
                "{} rows of logits for {} expected",
                logits.rows(),
                output.num_rows()
            );
        }
        // Spans follow `running` order, so one pass pairs them with their requests.
        let mut chosen: Vec<(&mut Request, &ScheduledSeq, usize)> = Vec::new();
        let mut row = 0;
        let mut running = self.running.iter_mut();
        for seq in &output.seqs {
            let Some(r) = running.by_ref().find(|r| r.id == seq.id) else {
                bail!(Internal, "scheduled request {} is not running", seq.id);
            };
            // Drafts are cached only once accepted (below).
            r.computed += seq.tokens.len() - seq.drafts;
            name_full_blocks(&mut self.pool, r, self.draft_model);
            if let Some(w) = &mut self.windows {
                name_full_blocks(&mut w.pool, r, self.draft_model);
            }
            if seq.sample {
                chosen.push((r, seq, row));
                row += 1 + seq.drafts;
            }
        }
        // Sample every request in parallel; each has its own RNG, so the order of work
        // does not change what any request draws. On the compute threads, whose helpers
        // wait between the step's operations anyway: rayon's would wake for this, then
        // spin and yield on the cores the next step needs.
        let previous: Vec<_> = chosen.iter().map(|(r, ..)| r.last_token).collect();
        let mut sampled: Vec<_> = chosen.into_iter().map(|c| (c, None)).collect();
        crate::threads::parallel_chunks_mut(&mut sampled, 1, &|_, one| {
            let ((r, seq, first), result) = &mut one[0];
            let rows = *first..*first + 1 + seq.drafts;
            *result = Some(r.sample_span(rows.map(|i| row_of(logits, i)), seq.draft_tokens()));
        });
        let mut stats = stats.lock();
        stats.prompt_tokens += output.prompt_tokens as u64;
        for (((r, seq, _), result), previous) in sampled.into_iter().zip(previous) {
            let Some(result) = result else {
                bail!(Internal, "request {} was not sampled", r.id);
            };
            let steps = match result {
                Ok(steps) => steps,
                Err(e) => {
                    r.state = RequestState::Failed;
                    r.emit(Event::Failed(e));
                    stats.failed += 1;
                    continue;
                }
            };
            let accepted = (steps.iter().zip(seq.draft_tokens()))
                .take_while(|(step, &draft)| step.token == draft)
                .count();
            stats.speculative_draft_tokens += seq.drafts as u64;
            stats.speculative_accepted_tokens += accepted as u64;
            // The draft model's cache keeps what was accepted; the rest is rolled back
            // (its slots are overwritten later).
            r.computed += accepted;
            r.draft_computed = r.draft_computed.min(r.computed);
            if accepted > 0 {
                name_full_blocks(&mut self.pool, r, self.draft_model);
                if let Some(w) = &mut self.windows {
                    name_full_blocks(&mut w.pool, r, self.draft_model);
                }
            }
            stats.generation_tokens += steps.len() as u64;
            match (previous, r.last_token, r.first_token) {
                // Tokens of one step arrive together: each gets its share of the gap.
                (Some(before), Some(last), _) => {
                    let gap = (last - before) / steps.len() as u32;
                    (0..steps.len()).for_each(|_| stats.itl.push(gap));
                }
                (None, _, Some(first)) => stats.ttft.push(first - r.arrived),
                _ => {}
            }
            for step in steps {
                let finished = step.finish_reason.is_some();
                if !r.emit(Event::Token(step)) && !finished {
                    // Nobody listens any more: stop spending work on it.
                    r.state = RequestState::Finished(FinishReason::Abort);
                    stats.aborted += 1;
                    break;
                } else if finished {
                    stats.finished += 1;
                }
            }
        }
        drop(stats);
        Ok(self.retire())
    }

    /// Removes finished and failed requests from the batch and frees their blocks.
    fn retire(&mut self) -> Vec<Request> {
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(Request::is_finished);
        self.running = running;
        for r in &done {
            self.release(r.id);
        }
        done
    }

    /// Ends request `id` wherever it is, freeing its blocks; it receives `Event::Aborted`.
    /// False when no such request is queued or running.
    pub fn abort(&mut self, id: RequestId) -> bool {
        let request = if let Some(i) = self.running.iter().position(|r| r.id == id) {
            Some(self.running.remove(i))
        } else {
            self.waiting
                .iter()
                .position(|r| r.id == id)
                .and_then(|i| self.waiting.remove(i))
        };
        self.release(id);
        let Some(mut request) = request else {
            return false;
        };
        request.state = RequestState::Finished(FinishReason::Abort);
        request.emit(Event::Aborted);
        true
    }

    /// Called when [`Scheduler::schedule`] found nothing to run although requests wait: the
    /// one at the head can never get its blocks. Fails it with `CacheFull`; false when
    /// there is none.
    pub fn fail_unschedulable(&mut self) -> bool {
        let mut request = if self.running.is_empty() {
            let Some(request) = self.waiting.pop_front() else {
                return false;
            };
            request
        } else {
            self.running.remove(0)
        };
        self.release(request.id);
        self.fail(&mut request);
        true
    }

    fn fail(&self, request: &mut Request) {
        request.state = RequestState::Failed;
        request.emit(Event::Failed(Error::CacheFull {
            needed: request.tokens.len(),
            capacity: self.pool.capacity_tokens(),
        }));
    }

    /// Takes every request out and frees all blocks (shutdown, or recovery after a fault).
    pub fn drain(&mut self) -> Vec<Request> {
        let mut all: Vec<Request> = self.running.drain(..).collect();
        all.extend(self.waiting.drain(..));
        for r in &all {
            self.release(r.id);
        }
        all
    }
}

/// Row `i` of `logits` as a request samples it: its token where the pass drew only that,
/// else its logits.
fn row_of(logits: &Logits, i: usize) -> Row<'_> {
    match logits.drawn() {
        Some(ids) => Row::Drawn(ids[i]),
        None => Row::Logits(&logits.values()[i * logits.vocab()..(i + 1) * logits.vocab()]),
    }
}

/// Names `r`'s blocks that its computed positions now fill (prefix caching); with a
/// draft model, only those its cache holds as well, so that a hit finds both.
fn name_full_blocks(pool: &mut BlockPool, r: &mut Request, draft_model: bool) {
    if pool.caching() {
        let upto = if draft_model {
            r.computed.min(r.draft_computed)
        } else {
            r.computed
        };
        let n = r.hash_blocks(pool.block_size(), upto);
        pool.name_full_blocks(r.id, &r.block_hashes[..n], &r.tokens, upto);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use proptest::prelude::*;

    use super::*;
    use crate::engine::request::{FinishReason, Sink};
    use crate::engine::sampling::SamplingParams;
    use crate::engine::testing::word_tokenizer;

    const VOCAB: usize = 8;

    /// One simulated workload: `(prompt length, max_tokens, step at which it is aborted,
    /// leading prompt tokens shared with the other requests)`. Besides the pool's
    /// invariants, a stand-in for the cache's memory (each slot holds the position and
    /// token written there) checks that every position a span attends to holds that
    /// sequence's token, cached blocks shared between requests included, and that no span
    /// writes into a block another request holds; with `draft_model`, a second stand-in
    /// checks the same of the draft model's passes; with `window`, a third one the same of
    /// window layers, over the last `window` positions of each query.
    fn run(
        requests: Vec<(usize, usize, Option<usize>, usize)>,
        num_blocks: usize,
        block_size: usize,
        (ring, window): (Option<Ring>, Option<usize>),
        (speculative, draft_model): (usize, bool),
    ) -> (u64, Stats) {
        let tok = word_tokenizer(VOCAB);
        let (tx, _rx) = mpsc::channel();
        let capacity = num_blocks * block_size;
        let windows = window.map(|window| {
            let n = crate::engine::core::window_blocks(window, block_size, (4, 24), num_blocks);
            Windows {
                pool: BlockPool::new(n, block_size, ring.is_none()),
                window,
            }
        });
        let window_capacity = windows.as_ref().map_or(0, |w| w.pool.capacity_tokens());
        let mut s = Scheduler::new(
            BlockPool::new(num_blocks, block_size, ring.is_none()),
            windows,
            ring,
            4,
            24,
            speculative,
            draft_model,
        );
        let mut aborts = Vec::new();
        for (id, &(prompt, max_tokens, abort, shared)) in requests.iter().enumerate() {
            // Odd requests sample (seeded): with a draft model they verify every token.
            let params = SamplingParams {
                max_tokens,
                temperature: if id % 2 == 1 { 0.9 } else { 0.0 },
                seed: Some(id as u64),
                ..SamplingParams::default()
            };
            // As `Engine::submit` admits them: a prompt must fit the cache.
            let max_len = if ring.is_some() { usize::MAX } else { capacity };
            let prompt = (0..prompt.min(capacity - 1))
                .map(|t| if t < shared { t % VOCAB } else { (t + id) % VOCAB } as u32)
                .collect();
            s.add(Request::new(
                id as u64,
                prompt,
                params,
                max_len,
                tok.clone(),
                Sink::Blocking(tx.clone()),
            ));
            if let Some(step) = abort {
                aborts.push((step, id as u64));
            }
        }
        let stats = Mutex::new(Stats::default());
        let mut memory: Vec<Option<(usize, u32)>> = vec![None; capacity];
        let mut draft_memory = memory.clone();
        let mut window_memory = vec![None; window_capacity];
        let mut done = 0;
        for step in 0..10_000 {
            for &(_, id) in aborts.iter().filter(|(at, _)| *at == step) {
                if s.abort(id) {
                    done += 1;
                }
            }
            if s.is_idle() {
                break;
            }
            let mut out = s.schedule(Instant::now());
            assert!(!out.is_empty(), "nothing scheduled: deadlock");
            s.pool.check();
            if let Some(w) = &s.windows {
                w.pool.check();
            }
            if draft_model {
                // What the draft passes may read: each sequence's tokens so far.
                let known: Vec<(u64, Vec<u32>)> =
                    s.running.iter().map(|r| (r.id, r.tokens.clone())).collect();
                let tables: Vec<(u64, Vec<u32>)> = (s.running.iter())
                    .map(|r| (r.id, s.pool.table(r.id).to_vec()))
                    .collect();
                s.draft(&mut out, |spans| {
                    let mut rows = Vec::new();
                    for q in &spans.seqs {
                        let tokens = &known.iter().find(|k| k.0 == q.id).unwrap().1;
                        check_span(q, tokens, &tables, &mut draft_memory, ring, block_size);
                        if q.sample {
                            rows.extend(draft_row(q.id, q.start + q.tokens.len() - 1));
                        }
                    }
                    Logits::new(rows, spans.num_rows(), VOCAB)
                })
                .unwrap();
                for q in &out.seqs {
                    assert_eq!(q.propose, 0);
                    let r = s.running.iter().find(|r| r.id == q.id).unwrap();
                    // A greedy request's drafts: the stand-in's argmax at each position
                    // from its newest token's on, in order.
                    if !r.draws_by_verifying() {
                        let want: Vec<u32> = (0..q.drafts)
                            .map(|j| draft_argmax(q.id, r.tokens.len() - 1 + j))
                            .collect();
                        assert_eq!(q.draft_tokens(), want, "{}'s drafts", q.id);
                    }
                }
            }
            let total: usize = out.seqs.iter().map(|q| q.tokens.len()).sum();
            assert!(total <= 24 && out.seqs.len() <= 4);
            let tables: Vec<(u64, Vec<u32>)> = (s.running.iter())
                .map(|r| (r.id, s.pool.table(r.id).to_vec()))
                .collect();
            for q in &out.seqs {
                let Some(r) = s.running.iter().find(|r| r.id == q.id) else {
                    panic!("{} scheduled but not running", q.id);
                };
                check_span(q, &r.tokens, &tables, &mut memory, ring, block_size);
                if let Some(w) = &s.windows {
                    let ids = s.running.iter().map(|r| r.id);
                    let tables: Vec<_> = ids.map(|id| (id, w.pool.table(id).to_vec())).collect();
                    check_window(
                        q,
                        &r.tokens,
                        &tables,
                        &mut window_memory,
                        w.window,
                        block_size,
                    );
                }
            }
            // Greedy picks 3, 3, 5, 3, 3, 5...: prompt lookup's drafts are sometimes
            // accepted, sometimes not.
            let mut logits = [0f32; VOCAB];
            logits[[3, 3, 5][step % 3]] = 1.0;
            let rows = Logits::new(logits.repeat(out.num_rows()), out.num_rows(), VOCAB);
            let rows = rows.unwrap();
            let ended = s.update_from_output(&out, &rows, &stats).unwrap();
            if draft_model {
                for r in &s.running {
                    assert!(r.draft_computed <= r.computed, "{}'s draft is ahead", r.id);
                }
            }
            for r in ended {
                assert!(matches!(
                    r.state,
                    RequestState::Finished(FinishReason::Length)
                ));
                assert!(r.generated() == r.params().max_tokens || r.tokens.len() > r.max_len);
                done += 1;
            }
            s.pool.check();
            if let Some(w) = &s.windows {
                w.pool.check();
            }
        }
        assert!(s.is_idle(), "requests left after the step limit");
        assert_eq!(done, requests.len());
        assert_eq!(s.pool.num_free(), num_blocks, "blocks leaked");
        if let Some(w) = &s.windows {
            assert_eq!(
                w.pool.num_free(),
                w.pool.num_blocks(),
                "window blocks leaked"
            );
        }
        (s.prefix_cache().1, stats.into_inner())
    }

    /// The draft model stand-in's choice for sequence `id` after the token at `position`:
    /// different for each sequence and position, so that a row given to the wrong
    /// request or position shows.
    fn draft_argmax(id: u64, position: usize) -> u32 {
        ((id as usize + position) % VOCAB) as u32
    }

    /// The stand-in's logits row for that choice.
    fn draft_row(id: u64, position: usize) -> [f32; VOCAB] {
        let mut row = [0f32; VOCAB];
        row[draft_argmax(id, position) as usize] = 2.0;
        row
    }

    /// Checks span `q` of a sequence whose tokens so far are `tokens` against the cache's
    /// stand-in `memory` (each slot: the position and token written there), then writes
    /// it: its table covers it and is the pool's (`tables`: every running request's),
    /// every earlier position holds the sequence's token (without a ring, where all are
    /// kept), and it writes into no block another request holds.
    fn check_span(
        q: &ScheduledSeq,
        tokens: &[u32],
        tables: &[(u64, Vec<u32>)],
        memory: &mut [Option<(usize, u32)>],
        ring: Option<Ring>,
        block_size: usize,
    ) {
        let need = Ring::slots(ring, q.start + q.tokens.len()).div_ceil(block_size);
        assert!(q.blocks.len() >= need, "table of {} too short", q.id);
        let table = &tables.iter().find(|t| t.0 == q.id).unwrap().1;
        assert_eq!(&q.blocks, table, "stale table of {}", q.id);
        let at = |p: usize| {
            let slot = Ring::slot(ring, p);
            q.blocks[slot / block_size] as usize * block_size + slot % block_size
        };
        if ring.is_none() {
            for p in 0..q.start.min(tokens.len()) {
                assert_eq!(memory[at(p)], Some((p, tokens[p])), "{}'s {p}", q.id);
            }
        }
        for (p, &t) in (q.start..).zip(&q.tokens) {
            let block = q.blocks[Ring::slot(ring, p) / block_size];
            for (id, other) in tables.iter().filter(|t| t.0 != q.id) {
                assert!(!other.contains(&block), "{} writes {id}'s {block}", q.id);
            }
            memory[at(p)] = Some((p, t));
        }
    }

    /// [`check_span`] for window layers: the window table (`q.window_blocks`, `tables`
    /// every running request's) covers the span, holds every position its queries read (the
    /// last `window` of each) and nothing of another request's is written.
    fn check_window(
        q: &ScheduledSeq,
        tokens: &[u32],
        tables: &[(u64, Vec<u32>)],
        memory: &mut [Option<(usize, u32)>],
        window: usize,
        block_size: usize,
    ) {
        let table = &tables.iter().find(|t| t.0 == q.id).unwrap().1;
        assert_eq!(&q.window_blocks, table, "stale window table of {}", q.id);
        assert!(q.window_blocks.len() >= (q.start + q.tokens.len()).div_ceil(block_size));
        let at = |p: usize| {
            let block = q.window_blocks[p / block_size];
            assert!(block != HOLE, "{}'s {p} read or written in a hole", q.id);
            block as usize * block_size + p % block_size
        };
        for p in (q.start + 1).saturating_sub(window)..q.start.min(tokens.len()) {
            assert_eq!(
                memory[at(p)],
                Some((p, tokens[p])),
                "{}'s {p} (window)",
                q.id
            );
        }
        for (p, &t) in (q.start..).zip(&q.tokens) {
            let block = q.window_blocks[p / block_size];
            for (id, other) in tables.iter().filter(|t| t.0 != q.id) {
                assert!(
                    !other.contains(&block),
                    "{} writes {id}'s window {block}",
                    q.id
                );
            }
            memory[at(p)] = Some((p, t));
        }
    }

    /// Requests that begin alike take each other's blocks: a 40-token prefix shared by
    /// six requests (blocks of 4) is found in the cache by all but the first.
    #[test]
    fn shared_prefixes_are_found() {
        let requests = vec![(50, 5, None, 40); 6];
        let (hits, _) = run(requests, 64, 4, (None, None), (0, false));
        assert_eq!(hits, 5 * 40);
    }

    /// The same with window layers (a window of 6): their blocks before the window leave
    /// the sequence, but stay cached, so the window before the shared prefix's end is
    /// found too, and the whole prefix is a hit.
    #[test]
    fn shared_prefixes_are_found_with_window_layers() {
        let requests = vec![(50, 5, None, 40); 6];
        let (hits, _) = run(requests, 64, 4, (None, Some(6)), (0, false));
        assert_eq!(hits, 5 * 40);
    }

    /// A draft model's passes keep its cache in step with the target's (checked by
    /// `run`'s second stand-in), through shared prefixes, and some drafts are accepted.
    #[test]
    fn draft_model_passes_keep_their_cache_in_step() {
        let requests = vec![(30, 30, None, 20); 3];
        let (hits, stats) = run(requests, 64, 4, (None, None), (3, true));
        assert_eq!(hits, 2 * 20);
        assert!(stats.speculative_accepted_tokens > 0, "{stats:?}");
        assert!(stats.speculative_draft_tokens > stats.speculative_accepted_tokens);
    }

    /// Two requests on a pool of 3 blocks of 2 positions: both are admitted in order; when
    /// both need a second block, the newest is preempted (its block freed, back to the
    /// front of the queue) and recomputed once the oldest has finished; both end whole.
    /// (Without prefix caching: with it, the newest would come straight back, sharing the
    /// oldest's first block.)
    #[test]
    fn the_newest_is_preempted_and_recomputed() -> Result<()> {
        let tok = word_tokenizer(VOCAB);
        let (tx, _rx) = mpsc::channel();
        let stats = Mutex::new(Stats::default());
        let mut s = Scheduler::new(BlockPool::new(3, 2, false), None, None, 4, 24, 0, false);
        for id in 0..2 {
            let params = SamplingParams {
                max_tokens: 3,
                ..SamplingParams::default()
            };
            s.add(Request::new(
                id,
                vec![1, 2],
                params,
                6,
                tok.clone(),
                Sink::Blocking(tx.clone()),
            ));
        }
        let mut logits = [0f32; VOCAB];
        logits[3] = 1.0;
        let ids = |out: &SchedulerOutput| out.seqs.iter().map(|q| q.id).collect::<Vec<_>>();

        let out = s.schedule(Instant::now());
        assert_eq!((ids(&out), out.prompt_tokens), (vec![0, 1], 4));
        s.update_from_output(&out, &Logits::new(logits.repeat(2), 2, VOCAB)?, &stats)?;
        // Each now needs a second block and one is free: the oldest takes it, the newest gives
        // its first one back and waits for two.
        let out = s.schedule(Instant::now());
        assert_eq!(ids(&out), [0]);
        assert_eq!(
            (s.preemptions(), s.num_waiting(), s.num_free_blocks()),
            (1, 1, 1)
        );
        let rows = |out: &SchedulerOutput| {
            Logits::new(logits.repeat(out.num_rows()), out.num_rows(), VOCAB)
        };
        let (mut out, mut ended) = (out, Vec::new());
        for _ in 0..20 {
            ended.extend(s.update_from_output(&out, &rows(&out)?, &stats)?);
            if s.is_idle() {
                break;
            }
            out = s.schedule(Instant::now());
            s.pool.check();
        }
        assert!(s.is_idle(), "requests left after 20 steps");
        assert_eq!(ended.iter().map(|r| r.id).collect::<Vec<_>>(), [0, 1]);
        for r in &ended {
            assert_eq!(r.generated(), 3);
            assert_eq!(r.state, RequestState::Finished(FinishReason::Length));
        }
        assert_eq!(s.num_free_blocks(), 3);
        Ok(())
    }

    /// Requests without a grammar or logprobs are marked for a pass that draws their
    /// tokens (the argmax for plain greedy ones, a penalized draw at the token's position
    /// for the others) and take the ids it gives (a NaN row fails its request alone).
    #[test]
    fn requests_take_the_tokens_the_pass_drew() -> Result<()> {
        let tok = word_tokenizer(VOCAB);
        let (tx, rx) = mpsc::channel();
        let stats = Mutex::new(Stats::default());
        let mut s = Scheduler::new(BlockPool::new(8, 4, true), None, None, 4, 24, 0, false);
        let greedy = SamplingParams {
            temperature: 0.0,
            max_tokens: 4,
            ..SamplingParams::default()
        };
        let penalized = SamplingParams {
            repetition_penalty: 1.3,
            ..greedy.clone()
        };
        let sampled = SamplingParams {
            temperature: 0.7,
            ..greedy.clone()
        };
        for (id, params) in [greedy.clone(), greedy, penalized, sampled]
            .into_iter()
            .enumerate()
        {
            s.add(Request::new(
                id as u64,
                vec![1, 2],
                params,
                16,
                tok.clone(),
                Sink::Blocking(tx.clone()),
            ));
        }
        let out = s.schedule(Instant::now());
        let draws: Vec<Draw> = out.seqs.iter().map(|q| q.draw.clone().unwrap()).collect();
        assert!(draws[0] == Draw::argmax() && draws[1] == Draw::argmax());
        // Penalized: both prompt tokens, neither generated yet.
        let mut penalized = draws[2].penalized.clone();
        penalized.sort_unstable();
        assert_eq!(
            (draws[2].temperature, penalized),
            (0.0, vec![(1, 0), (2, 0)])
        );
        assert!(draws[3].temperature == 0.7 && draws[3].penalized.is_empty());
        // The first two alone, as a pass would see them.
        s.abort(2);
        s.abort(3);
        let two = SchedulerOutput {
            seqs: out.seqs.into_iter().take(2).collect(),
            prompt_tokens: 4,
        };
        s.update_from_output(&two, &Logits::drawn_only(vec![7, u32::MAX], VOCAB), &stats)?;
        let events: Vec<_> = rx.try_iter().collect();
        let token = |id: u64| {
            events.iter().find_map(|o| match &o.event {
                Event::Token(step) if o.id == id => Some(step.token),
                _ => None,
            })
        };
        assert_eq!(token(0), Some(7));
        assert!(events
            .iter()
            .any(|o| o.id == 1 && matches!(o.event, Event::Failed(Error::Engine(_)))));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random workloads on a small cache, with prefixes shared, aborts, preemptions
        /// and drafts accepted and rejected: every request ends, the pool's invariants hold after each step,
        /// every position read holds what its sequence wrote, and every block comes back.
        #[test]
        fn block_accounting_holds(
            requests in prop::collection::vec(
                (1usize..60, 1usize..40, prop::option::of(0usize..80), 0usize..60), 1..12),
            num_blocks in 4usize..24,
            block_size in prop::sample::select(vec![1usize, 4, 16]),
            speculative in prop::sample::select(vec![0usize, 3]),
            draft_model in any::<bool>(),
            window in prop::option::of(1usize..12),
        ) {
            let draft_model = draft_model && speculative > 0;
            run(requests, num_blocks, block_size, (None, window), (speculative, draft_model));
        }

        #[test]
        fn block_accounting_holds_with_a_ring(
            requests in prop::collection::vec(
                (1usize..60, 1usize..40, prop::option::of(0usize..80), 0usize..60), 1..12),
            window in 2usize..20,
            draft_model in any::<bool>(),
            layers_window in prop::option::of(1usize..12),
        ) {
            let ring = Ring { keep: 4, window };
            run(requests, 8, 4, (Some(ring), layers_window), (3, draft_model));
        }
    }
}
