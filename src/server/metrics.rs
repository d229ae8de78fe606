//! The server's Prometheus metrics (text exposition format 0.0.4): requests by endpoint
//! and status, token counters, latency histograms measured where the client sees them
//! (from the request's arrival), and the engine's queue, batch and KV-cache gauges read at
//! scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use parking_lot::Mutex;

use crate::engine::Stats;

/// Upper bounds (seconds) of the latency buckets: 1 ms to 60 s, roughly ×2.5 apart.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += s;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            let le = BUCKETS.get(i).map_or("+Inf".to_string(), f64::to_string);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {cumulative}", self.sum);
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// (endpoint, HTTP status) → count.
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
    ttft: Histogram,
    itl: Histogram,
    duration: Histogram,
}

#[derive(Debug, Default)]
pub struct Metrics(Mutex<Inner>);

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16, duration: Duration) {
        let mut m = self.0.lock();
        *m.requests
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
        m.duration.observe(duration);
    }

    pub fn tokens(&self, prompt: usize, generated: usize) {
        let mut m = self.0.lock();
        m.prompt_tokens += prompt as u64;
        m.generation_tokens += generated as u64;
    }

    pub fn first_token(&self, ttft: Duration) {
        self.0.lock().ttft.observe(ttft);
    }

    pub fn inter_token(&self, gap: Duration) {
        self.0.lock().itl.observe(gap);
    }

    /// The exposition text, with the engine's gauges from `engine`.
    pub fn render(&self, engine: &Stats) -> String {
        let m = self.0.lock();
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP cortex_requests_total HTTP requests by endpoint and status.\n\
             # TYPE cortex_requests_total counter\n",
        );
        for ((endpoint, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "cortex_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "cortex_prompt_tokens_total",
            "Prompt tokens of finished requests.",
            m.prompt_tokens,
        );
        counter(
            &mut out,
            "cortex_generation_tokens_total",
            "Tokens generated for finished requests.",
            m.generation_tokens,
        );
        m.ttft.write(
            &mut out,
            "cortex_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
        );
        m.itl.write(
            &mut out,
            "cortex_inter_token_latency_seconds",
            "Time between consecutive tokens of a choice.",
        );
        m.duration.write(
            &mut out,
            "cortex_request_duration_seconds",
            "Time from a request's arrival to its last byte.",
        );
        drop(m);
        gauge(
            &mut out,
            "cortex_requests_waiting",
            "Requests queued in the engine.",
            engine.waiting as f64,
        );
        gauge(
            &mut out,
            "cortex_requests_running",
            "Requests in the engine's running batch.",
            engine.running as f64,
        );
        gauge(
            &mut out,
            "cortex_kv_cache_usage_ratio",
            "Fraction of KV cache blocks in use.",
            engine.kv_usage(),
        );
        gauge(
            &mut out,
            "cortex_kv_cache_blocks_free",
            "Free KV cache blocks.",
            engine.kv_blocks_free as f64,
        );
        gauge(
            &mut out,
            "cortex_kv_cache_blocks_total",
            "KV cache blocks.",
            engine.kv_blocks_total as f64,
        );
        gauge(
            &mut out,
            "cortex_kv_cache_window_blocks_free",
            "Free KV cache blocks of sliding-window layers that keep only their window.",
            engine.kv_window_blocks_free as f64,
        );
        gauge(
            &mut out,
            "cortex_kv_cache_window_blocks_total",
            "KV cache blocks of sliding-window layers that keep only their window (0: none).",
            engine.kv_window_blocks_total as f64,
        );
        counter(
            &mut out,
            "cortex_preemptions_total",
            "Requests preempted (their cache freed, recomputed later).",
            engine.preemptions,
        );
        counter(
            &mut out,
            "cortex_prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            engine.prefix_cache_queries,
        );
        counter(
            &mut out,
            "cortex_prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache (not computed again).",
            engine.prefix_cache_hits,
        );
        gauge(
            &mut out,
            "cortex_prefix_cache_blocks",
            "KV cache blocks holding a cached prefix.",
            engine.prefix_cache_blocks as f64,
        );
        counter(
            &mut out,
            "cortex_speculative_draft_tokens_total",
            "Draft tokens proposed by speculative decoding.",
            engine.speculative_draft_tokens,
        );
        counter(
            &mut out,
            "cortex_speculative_accepted_tokens_total",
            "Draft tokens the model accepted.",
            engine.speculative_accepted_tokens,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_end_at_inf() {
        let m = Metrics::default();
        m.first_token(Duration::from_millis(3));
        m.first_token(Duration::from_millis(3));
        m.first_token(Duration::from_secs(100));
        m.request("/v1/completions", 200, Duration::from_millis(20));
        let text = m.render(&Stats::default());
        assert!(text.contains("cortex_time_to_first_token_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("cortex_time_to_first_token_seconds_bucket{le=\"0.005\"} 2"));
        assert!(text.contains("cortex_time_to_first_token_seconds_bucket{le=\"60\"} 2"));
        assert!(text.contains("cortex_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("cortex_time_to_first_token_seconds_count 3"));
        assert!(
            text.contains("cortex_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1")
        );
    }
}
