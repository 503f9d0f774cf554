//! `/metrics` in the Prometheus text format: HTTP requests by route and status, and the
//! scheduler's counters, gauges and latency histograms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use trellis_runtime::scheduler::{Histogram, SchedulerMetrics};

/// Counts of HTTP requests, kept by the server's middleware.
#[derive(Default)]
pub struct HttpMetrics {
    /// (route, status) → responses.
    responses: Mutex<BTreeMap<(String, u16), u64>>,
    in_flight: AtomicI64,
}

impl HttpMetrics {
    pub fn record(&self, route: &str, status: u16) {
        let mut responses = self.responses.lock().unwrap_or_else(|e| e.into_inner());
        *responses.entry((route.to_string(), status)).or_default() += 1;
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }
}

pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The whole `/metrics` page.
pub fn render(http: &HttpMetrics, scheduler: &SchedulerMetrics, model: &str) -> String {
    let mut out = String::new();
    let label = format!("model=\"{}\"", escape_label(model));
    {
        let responses = http.responses.lock().unwrap_or_else(|e| e.into_inner());
        header(
            &mut out,
            "trellis_http_requests_total",
            "counter",
            "HTTP responses by route and status.",
        );
        for ((route, status), count) in responses.iter() {
            let _ = writeln!(
                out,
                "trellis_http_requests_total{{route=\"{}\",status=\"{status}\"}} {count}",
                escape_label(route)
            );
        }
    }
    gauge(
        &mut out,
        "trellis_http_requests_in_flight",
        "HTTP requests being handled, until their response starts (see trellis_running_sequences for streams).",
        &label,
        http.in_flight.load(Ordering::Relaxed) as f64,
    );
    let counters = [
        (
            "trellis_requests_total",
            "Generations accepted by the scheduler.",
            &scheduler.requests_total,
        ),
        (
            "trellis_requests_failed_total",
            "Generations that failed.",
            &scheduler.requests_failed,
        ),
        (
            "trellis_requests_cancelled_total",
            "Generations cancelled (client disconnected, or shutdown).",
            &scheduler.requests_cancelled,
        ),
        (
            "trellis_prompt_tokens_total",
            "Prompt tokens of admitted generations.",
            &scheduler.prompt_tokens_total,
        ),
        (
            "trellis_generation_tokens_total",
            "Tokens generated.",
            &scheduler.generated_tokens_total,
        ),
        (
            "trellis_scheduler_steps_total",
            "Forward passes run by the scheduler.",
            &scheduler.steps_total,
        ),
    ];
    for (name, help, value) in counters {
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name}{{{label}}} {}", value.load(Ordering::Relaxed));
    }
    let gauges = [
        (
            "trellis_queue_depth",
            "Generations waiting for a place in the batch.",
            &scheduler.queue_depth,
        ),
        (
            "trellis_running_sequences",
            "Generations in the batch.",
            &scheduler.running,
        ),
        (
            "trellis_batch_size",
            "Sequences sampled in the last forward pass.",
            &scheduler.last_batch_size,
        ),
    ];
    for (name, help, value) in gauges {
        gauge(
            &mut out,
            name,
            help,
            &label,
            value.load(Ordering::Relaxed) as f64,
        );
    }
    histogram(
        &mut out,
        "trellis_time_to_first_token_seconds",
        "Time from submission to the first generated token.",
        &label,
        &scheduler.time_to_first_token,
    );
    histogram(
        &mut out,
        "trellis_inter_token_latency_seconds",
        "Time between consecutive tokens of a generation.",
        &label,
        &scheduler.inter_token_latency,
    );
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, label: &str, value: f64) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name}{{{label}}} {value}");
}

fn histogram(out: &mut String, name: &str, help: &str, label: &str, histogram: &Histogram) {
    header(out, name, "histogram", help);
    let (cumulative, sum, count) = histogram.snapshot();
    for (i, c) in cumulative.iter().enumerate() {
        let bound = histogram
            .bounds
            .get(i)
            .map_or_else(|| "+Inf".to_string(), f64::to_string);
        let _ = writeln!(out, "{name}_bucket{{{label},le=\"{bound}\"}} {c}");
    }
    let _ = writeln!(out, "{name}_sum{{{label}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{label}}} {count}");
}

/// Label values escape backslashes, quotes and newlines.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn responses_are_counted_by_route_and_status() {
        let http = HttpMetrics::default();
        http.record("/v1/models", 200);
        http.record("/v1/models", 200);
        http.record("/v1/models", 401);
        {
            let _guard = http.in_flight();
            assert_eq!(http.in_flight.load(Ordering::Relaxed), 1);
        }
        assert_eq!(http.in_flight.load(Ordering::Relaxed), 0);
        let responses = http.responses.lock().unwrap();
        assert_eq!(responses[&("/v1/models".to_string(), 200)], 2);
        assert_eq!(responses[&("/v1/models".to_string(), 401)], 1);
    }
}
