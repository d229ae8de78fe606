//! The runner (vLLM's `ModelRunner`): owns the KV cache's memory and executes what the
//! scheduler decided. It turns a [`SchedulerOutput`] — plain token spans and block tables,
//! never the scheduler itself — into one batch, each span's tokens side by side, runs the
//! decoder over it and returns the logits of the sequences that sample. It decides nothing.

use std::sync::Arc;

use crate::error::Result;
use crate::model::attention::SeqSpan;
use crate::model::{Batch, Logits, Model};

use super::kv::KvStorage;
use super::scheduler::SchedulerOutput;

pub struct Runner {
    model: Arc<Model>,
    /// Keys and values of every block the scheduler's pool hands out.
    storage: KvStorage,
}

impl Runner {
    pub fn new(model: Arc<Model>, storage: KvStorage) -> Self {
        Runner { model, storage }
    }

    /// The cache's memory (for saved prefixes, between steps).
    pub fn storage(&mut self) -> &mut KvStorage {
        &mut self.storage
    }

    /// Runs one step's spans (the middle third of a step), writing their keys and values
    /// into their blocks. Returns logits `[output.num_rows()][vocab]`, in `output`
    /// order.
    pub fn execute(&mut self, output: &SchedulerOutput) -> Result<Logits> {
        let mut batch = Batch {
            tokens: Vec::new(),
            seqs: Vec::with_capacity(output.seqs.len()),
            logits_rows: Vec::new(),
            argmax_only: output.seqs.iter().all(|s| !s.sample || s.argmax_only),
        };
        for seq in &output.seqs {
            let row = batch.tokens.len();
            let len = seq.tokens.len();
            batch.tokens.extend_from_slice(&seq.tokens);
            batch.seqs.push(SeqSpan {
                row,
                len,
                start: seq.start,
                blocks: &seq.blocks,
            });
            if seq.sample {
                // The newest position's logits, and each draft's before it.
                let last = row + len - 1;
                batch
                    .logits_rows
                    .extend((last - seq.drafts..=last).map(|r| r as u32));
            }
        }
        self.model.decoder().forward(&batch, &mut self.storage)
    }
}
