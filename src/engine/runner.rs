//! The runner: turns a step's plan into one batch — each scheduled request's next tokens
//! side by side, with its block table — runs the decoder over it, and records what is now
//! cached.

use std::time::Instant;

use crate::error::{bail, Result};
use crate::model::attention::{KvStorage, SeqSpan};
use crate::model::{Batch, Decoder};

use super::request::{RequestId, RequestState};
use super::scheduler::{Plan, Scheduler};

/// What a step's forward pass produced.
pub struct Executed {
    /// Requests whose newest token was computed: they sample next, in `running` order.
    pub sampled: Vec<RequestId>,
    /// Their logits, `[sampled, vocab]`.
    pub rows: Vec<Vec<f32>>,
    /// Prompt tokens (or recomputed ones) in the step.
    pub prompt_tokens: usize,
}

pub fn execute(
    decoder: &Decoder,
    storage: &mut KvStorage,
    sched: &mut Scheduler,
    plan: &Plan,
    now: Instant,
) -> Result<Executed> {
    let mut batch = Batch {
        tokens: Vec::new(),
        seqs: Vec::with_capacity(plan.len()),
        logits_rows: Vec::new(),
    };
    let mut sampled = Vec::new();
    let mut prompt_tokens = 0;
    // Plan entries follow `running` order, so one pass pairs them up.
    let mut running = sched.running.iter_mut();
    for &(id, n) in plan {
        let Some(r) = running.by_ref().find(|r| r.id == id) else {
            bail!(Internal, "scheduled request {id} is not running");
        };
        r.first_scheduled.get_or_insert(now);
        let row = batch.tokens.len();
        batch
            .tokens
            .extend_from_slice(&r.tokens[r.computed..r.computed + n]);
        batch.seqs.push(SeqSpan {
            row,
            len: n,
            start: r.computed,
            blocks: sched.pool.table(id),
        });
        if r.computed + n == r.tokens.len() {
            batch.logits_rows.push((row + n - 1) as u32);
            sampled.push(id);
        }
        if n > 1 || r.state == RequestState::Prefilling {
            prompt_tokens += n;
        }
    }
    let logits = decoder.forward(&batch, storage)?;
    drop(batch);
    sched.computed(plan);
    Ok(Executed {
        sampled,
        rows: logits.to_vec2::<f32>()?,
        prompt_tokens,
    })
}
