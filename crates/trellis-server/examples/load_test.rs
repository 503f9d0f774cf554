//! A bounded load test for `trellis serve` on loopback: `--concurrency` clients each send
//! `--requests` streaming chat completions one after another, hanging up on a random
//! `--cancel-fraction` of them after the first chunk. Every stream that is not dropped must be
//! whole and well-formed (a role chunk first, one finish reason, usage with exactly
//! `--max-tokens` tokens, `[DONE]` last); any error or malformed stream fails the run.
//! Prints generated tokens per second (from the streams' usage) over the wall time.
//!
//! ```sh
//! trellis serve <model> --port 8000 --max-batch 64 &
//! cargo run --release -p trellis-server --example load_test -- --url http://127.0.0.1:8000 \
//!     --concurrency 8 --requests 4 --max-tokens 64 --cancel-fraction 0.1
//! ```

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

struct Options {
    url: String,
    concurrency: usize,
    requests: usize,
    max_tokens: usize,
    cancel_fraction: f64,
    seed: u64,
}

fn parse_options() -> Options {
    let mut options = Options {
        url: "http://127.0.0.1:8000".into(),
        concurrency: 8,
        requests: 4,
        max_tokens: 64,
        cancel_fraction: 0.1,
        seed: 0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or_else(|| {
            eprintln!("{} needs a value", pair[0]);
            std::process::exit(2)
        });
        let number = |v: &str| -> f64 {
            v.parse().unwrap_or_else(|_| {
                eprintln!("{} needs a number, got {v}", pair[0]);
                std::process::exit(2)
            })
        };
        match pair[0].as_str() {
            "--url" => options.url = value.trim_end_matches('/').to_string(),
            "--concurrency" => options.concurrency = number(value) as usize,
            "--requests" => options.requests = number(value) as usize,
            "--max-tokens" => options.max_tokens = number(value) as usize,
            "--cancel-fraction" => options.cancel_fraction = number(value),
            "--seed" => options.seed = number(value) as u64,
            other => {
                eprintln!(
                    "unknown option {other}; options: --url --concurrency --requests --max-tokens --cancel-fraction --seed"
                );
                std::process::exit(2)
            }
        }
    }
    options
}

/// What one client saw.
#[derive(Default)]
struct Tally {
    whole: usize,
    cancelled: usize,
    generated_tokens: usize,
    first_token_seconds: Vec<f64>,
    request_seconds: Vec<f64>,
    problems: Vec<String>,
}

/// Checks a whole chat stream; returns its completion tokens.
fn check_stream(body: &str, max_tokens: usize) -> Result<usize, String> {
    let data: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .collect();
    if data.last() != Some(&"[DONE]") {
        return Err(format!("no [DONE] at the end: {body:.200}"));
    }
    let mut finish = None;
    let mut usage = None;
    for (i, d) in data[..data.len() - 1].iter().enumerate() {
        let chunk: Value = serde_json::from_str(d).map_err(|e| format!("bad JSON {d}: {e}"))?;
        if chunk.get("error").is_some() {
            return Err(format!("error event: {chunk}"));
        }
        if i == 0 && chunk["choices"][0]["delta"]["role"] != "assistant" {
            return Err(format!("first chunk has no role: {chunk}"));
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = u["completion_tokens"].as_u64();
        } else if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str()
            && finish.replace(reason.to_string()).is_some()
        {
            return Err("two finish reasons".into());
        }
    }
    if finish.as_deref() != Some("length") {
        return Err(format!("finish reason {finish:?}, expected length"));
    }
    match usage {
        Some(n) if n as usize == max_tokens => Ok(n as usize),
        other => Err(format!("usage {other:?}, expected {max_tokens} tokens")),
    }
}

async fn run_client(id: usize, client: reqwest::Client, options: std::sync::Arc<Options>) -> Tally {
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed ^ (id as u64 * 0x9e37_79b9));
    let mut tally = Tally::default();
    for request in 0..options.requests {
        let body = json!({
            "messages": [{"role": "user", "content": format!("Client {id}, question {request}: tell me a story.")}],
            "max_tokens": options.max_tokens,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let started = Instant::now();
        let response = client
            .post(format!("{}/v1/chat/completions", options.url))
            .json(&body)
            .send()
            .await;
        let mut response = match response {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                tally.problems.push(format!("HTTP {status}: {text}"));
                continue;
            }
            Err(e) => {
                tally.problems.push(format!("request failed: {e}"));
                continue;
            }
        };
        let cancel = rng.random_bool(options.cancel_fraction);
        let mut body = String::new();
        let mut first_token = None;
        loop {
            match response.chunk().await {
                Ok(Some(bytes)) => {
                    body.push_str(&String::from_utf8_lossy(&bytes));
                    if first_token.is_none() && body.matches("data: ").count() >= 2 {
                        first_token = Some(started.elapsed().as_secs_f64());
                        if cancel {
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tally.problems.push(format!("stream broke: {e}"));
                    break;
                }
            }
        }
        if cancel {
            drop(response);
            tally.cancelled += 1;
            continue;
        }
        match check_stream(&body, options.max_tokens) {
            Ok(tokens) => {
                tally.whole += 1;
                tally.generated_tokens += tokens;
                tally.request_seconds.push(started.elapsed().as_secs_f64());
                tally.first_token_seconds.extend(first_token);
            }
            Err(problem) => tally.problems.push(problem),
        }
    }
    tally
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let options = std::sync::Arc::new(parse_options());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("an HTTP client");
    let started = Instant::now();
    let clients: Vec<_> = (0..options.concurrency)
        .map(|id| tokio::spawn(run_client(id, client.clone(), options.clone())))
        .collect();
    let mut total = Tally::default();
    for handle in clients {
        let tally = handle.await.expect("a client task");
        total.whole += tally.whole;
        total.cancelled += tally.cancelled;
        total.generated_tokens += tally.generated_tokens;
        total.first_token_seconds.extend(tally.first_token_seconds);
        total.request_seconds.extend(tally.request_seconds);
        total.problems.extend(tally.problems);
    }
    let seconds = started.elapsed().as_secs_f64();
    let health = client
        .get(format!("{}/health", options.url))
        .send()
        .await
        .map(|r| r.status().as_u16());
    println!(
        "concurrency {} | requests {} whole, {} cancelled, {} problems | {} tokens in {:.2} s = {:.1} generated tok/s | ttft p50 {:.0} ms p99 {:.0} ms | request p50 {:.2} s | health {:?}",
        options.concurrency,
        total.whole,
        total.cancelled,
        total.problems.len(),
        total.generated_tokens,
        seconds,
        total.generated_tokens as f64 / seconds,
        percentile(&mut total.first_token_seconds, 0.5) * 1e3,
        percentile(&mut total.first_token_seconds, 0.99) * 1e3,
        percentile(&mut total.request_seconds, 0.5),
        health,
    );
    for problem in total.problems.iter().take(10) {
        eprintln!("problem: {problem}");
    }
    if !total.problems.is_empty() || health.ok() != Some(200) {
        std::process::exit(1);
    }
}
