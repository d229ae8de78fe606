//! The runner (vLLM's `ModelRunner`): owns the KV cache's memory and executes what the
//! scheduler decided. It turns a [`SchedulerOutput`] — plain token spans and block tables,
//! never the scheduler itself — into one batch, each span's tokens side by side, runs the
//! decoder over it and returns the logits of the sequences that sample. It decides nothing.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::attention::SeqSpan;
use crate::model::{Batch, Logits, Model};

use super::kv::KvStorage;
use super::scheduler::{ScheduledSeq, SchedulerOutput};

/// Most tokens of one pass that refills a draft model's cache for a loaded prefix (the
/// size of a long prefill chunk: a pass's buffers grow with its tokens).
const DRAFT_FILL_CHUNK: usize = 512;

pub struct Runner {
    model: Arc<Model>,
    /// Keys and values of every block the scheduler's pool hands out.
    storage: KvStorage,
    /// A draft model (speculative decoding) and its cache, whose blocks are the target's:
    /// block `b` of one holds the same positions as block `b` of the other.
    draft: Option<(Arc<Model>, KvStorage)>,
}

impl Runner {
    pub fn new(
        model: Arc<Model>,
        storage: KvStorage,
        draft: Option<(Arc<Model>, KvStorage)>,
    ) -> Self {
        Runner {
            model,
            storage,
            draft,
        }
    }

    /// The cache's memory (for saved prefixes, between steps).
    pub fn storage(&mut self) -> &mut KvStorage {
        &mut self.storage
    }

    pub fn has_draft(&self) -> bool {
        self.draft.is_some()
    }

    /// Runs one step's spans (the middle third of a step), writing their keys and values
    /// into their blocks. Returns logits `[output.num_rows()][vocab]`, in `output`
    /// order.
    pub fn execute(&mut self, output: &SchedulerOutput) -> Result<Logits> {
        self.model
            .decoder()
            .forward(&batch(&output.seqs), &mut self.storage)
    }

    /// Runs spans on the draft model, into its cache; logits as [`Runner::execute`]'s.
    pub fn execute_draft(&mut self, output: &SchedulerOutput) -> Result<Logits> {
        let (model, storage) =
            (self.draft.as_mut()).ok_or_else(|| Error::Internal("no draft model".into()))?;
        model.decoder().forward(&batch(&output.seqs), storage)
    }

    /// Writes the draft model's keys and values for positions `from..tokens.len()` of
    /// `tokens` (whose blocks are `table`; earlier positions are cached), for a prefix
    /// whose target keys and values were loaded; without a draft model, nothing.
    pub fn fill_draft(&mut self, tokens: &[u32], from: usize, table: &[u32]) -> Result<()> {
        let Some((model, storage)) = self.draft.as_mut() else {
            return Ok(());
        };
        let mut start = from;
        while start < tokens.len() {
            let end = (start + DRAFT_FILL_CHUNK).min(tokens.len());
            let span = ScheduledSeq {
                id: 0,
                tokens: tokens[start..end].to_vec(),
                start,
                blocks: table.to_vec(),
                window_blocks: Vec::new(),
                sample: false,
                draw: None,
                drafts: 0,
                propose: 0,
            };
            model.decoder().forward(&batch(&[span]), storage)?;
            start = end;
        }
        Ok(())
    }
}

/// One batch of `seqs`, each span's tokens side by side; logits rows for the sampled
/// spans' newest position and each draft's before it.
fn batch(seqs: &[ScheduledSeq]) -> Batch<'_> {
    let mut batch = Batch {
        tokens: Vec::new(),
        seqs: Vec::with_capacity(seqs.len()),
        logits_rows: Vec::new(),
        // Each sampled span's draw for each of its rows, if every one has a draw.
        draws: (seqs.iter().filter(|s| s.sample))
            .map(|s| s.draw.as_ref().map(|d| vec![d.clone(); s.drafts + 1]))
            .collect::<Option<Vec<_>>>()
            .map(|rows| rows.concat()),
    };
    for seq in seqs {
        let row = batch.tokens.len();
        let len = seq.tokens.len();
        batch.tokens.extend_from_slice(&seq.tokens);
        batch.seqs.push(SeqSpan {
            row,
            len,
            start: seq.start,
            blocks: &seq.blocks,
            window_blocks: &seq.window_blocks,
        });
        if seq.sample {
            // The newest position's logits, and each draft's before it.
            let last = row + len - 1;
            batch
                .logits_rows
                .extend((last - seq.drafts..=last).map(|r| r as u32));
        }
    }
    batch
}
