//! Engine statistics: throughput, time to first token and inter-token latency
//! percentiles over recent requests, queue and batch sizes, KV cache usage.

use std::collections::VecDeque;
use std::time::Duration;

/// Latency samples kept for percentiles (the most recent ones).
const SAMPLES: usize = 4096;

#[derive(Debug, Clone, Default)]
pub struct Latencies(VecDeque<f64>);

impl Latencies {
    pub fn push(&mut self, d: Duration) {
        if self.0.len() == SAMPLES {
            self.0.pop_front();
        }
        self.0.push_back(d.as_secs_f64());
    }

    /// The `q`-quantile in seconds (nearest rank), or 0 without samples.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let mut v: Vec<f64> = self.0.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub waiting: usize,
    pub running: usize,
    pub finished: u64,
    pub aborted: u64,
    pub failed: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Prompt tokens run through the model (recomputed ones included).
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    /// Seconds spent in forward passes and sampling.
    pub busy_seconds: f64,
    /// Seconds spent computing grammar masks, on other threads while forward passes ran.
    pub mask_seconds: f64,
    pub kv_blocks_total: usize,
    pub kv_blocks_free: usize,
    /// Blocks of the sliding-window layers that keep only their window (0: none do).
    pub kv_window_blocks_total: usize,
    pub kv_window_blocks_free: usize,
    pub kv_block_size: usize,
    /// Whether prefix caching is on.
    pub prefix_caching: bool,
    /// Prompt tokens of admitted requests (recomputed ones included) looked up in the
    /// prefix cache, and those found there (not computed again).
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// Blocks holding a cached prefix now (in use or free).
    pub prefix_cache_blocks: usize,
    /// Tokens proposed by speculative decoding, and those the model accepted.
    pub speculative_draft_tokens: u64,
    pub speculative_accepted_tokens: u64,
    pub ttft: Latencies,
    pub itl: Latencies,
}

impl Stats {
    /// Generated tokens per busy second, over the engine's life.
    pub fn generation_tps(&self) -> f64 {
        self.generation_tokens as f64 / self.busy_seconds.max(1e-9)
    }

    pub fn prompt_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.busy_seconds.max(1e-9)
    }

    /// Fraction of looked-up prompt tokens found in the prefix cache.
    pub fn prefix_cache_hit_rate(&self) -> f64 {
        self.prefix_cache_hits as f64 / self.prefix_cache_queries.max(1) as f64
    }

    /// Fraction of draft tokens accepted.
    pub fn speculative_acceptance_rate(&self) -> f64 {
        self.speculative_accepted_tokens as f64 / self.speculative_draft_tokens.max(1) as f64
    }

    /// Fraction of the KV cache's blocks in use.
    pub fn kv_usage(&self) -> f64 {
        1.0 - self.kv_blocks_free as f64 / self.kv_blocks_total.max(1) as f64
    }
}
