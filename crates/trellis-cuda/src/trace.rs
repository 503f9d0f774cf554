//! Launch timeline of decode steps as they really run (graphs, dependent launch), for finding
//! what holds a step's critical path. Per-launch event timing (`TRELLIS_CUDA_PROFILE`) and ncu
//! both serialise the kernels, so they time each kernel alone and miss how much of it the
//! dependent launch hides.
//!
//! With [`TRACE_ENV`] set, the kernels are compiled with `TRELLIS_TRACE`: block (0, 0, 0) of
//! every launch writes the global nanosecond time at which its wait for the predecessor
//! returned (see `pdl_entry` in `kernels/common.cu`), and the host keeps the kernel name of
//! every launch, in the same order. Kernel k + 1's wait returns when kernel k has completed, so
//! the gap between successive release times is kernel k's share of the critical path.

use cudarc::driver::{CudaModule, CudaStream};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

/// Env var: `1` records the launch timeline (slows nothing measurably, but compiles a second
/// PTX) and prints, when the backend is dropped, each kernel's share of the last steps.
pub const TRACE_ENV: &str = "TRELLIS_CUDA_TRACE";

/// Entries of the device ring (`TRACE_CAPACITY` in `kernels/common.cu`).
const CAPACITY: usize = 65536;
/// Phase marks per launch (`TRACE_MARKS` in `kernels/common.cu`; mark 0 is unused).
const MARKS: usize = 8;
/// Step starts remembered (the report averages over the last steps of one shape).
const STEP_RING: usize = 64;

/// The host half of the timeline: kernel names by launch index, and where steps began.
pub(crate) struct LaunchTrace {
    module: Arc<CudaModule>,
    log: Mutex<TraceLog>,
}

struct TraceLog {
    /// Kernel name and grid of each launch, by launch index modulo [`CAPACITY`].
    names: Vec<(&'static str, (u32, u32, u32))>,
    launches: usize,
    step_starts: Vec<usize>,
    steps: usize,
}

impl LaunchTrace {
    pub fn new(module: Arc<CudaModule>) -> LaunchTrace {
        LaunchTrace {
            module,
            log: Mutex::new(TraceLog {
                names: vec![("", (0, 0, 0)); CAPACITY],
                launches: 0,
                step_starts: vec![0; STEP_RING],
                steps: 0,
            }),
        }
    }

    /// Note a launch of `name` over `blocks` (also a replayed one: the graph launches it).
    pub fn launch(&self, name: &'static str, blocks: (u32, u32, u32)) {
        let mut log = self.log.lock().expect("trace");
        let i = log.launches % CAPACITY;
        log.names[i] = (name, blocks);
        log.launches += 1;
    }

    pub fn begin_step(&self) {
        let mut log = self.log.lock().expect("trace");
        let (i, start) = (log.steps % STEP_RING, log.launches);
        log.step_starts[i] = start;
        log.steps += 1;
    }

    /// The report: per kernel and grid, its mean share (µs) of the last steps that have the
    /// shape of the last one with the mean times of its phase marks, and the order of the first
    /// launches of such a step. The stream must be idle (the caller synchronises).
    pub fn report(&self, stream: &Arc<CudaStream>) -> String {
        let log = self.log.lock().expect("trace");
        let read = |name: &str| -> Result<Vec<u8>, String> {
            let view = self
                .module
                .get_global(name, stream)
                .map_err(|e| format!("{name}: {e}"))?;
            stream
                .clone_dtoh(&view)
                .map_err(|e| format!("reading {name}: {e}"))
        };
        let (count, ring, marks) = match (
            read("trellis_trace_next"),
            read("trellis_trace"),
            read("trellis_marks"),
        ) {
            (Ok(c), Ok(r), Ok(m)) => (c, r, m),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                return format!("launch trace unreadable: {e}\n");
            }
        };
        let recorded = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
        if recorded != log.launches % (1 << 32) {
            return format!(
                "launch trace: {} launches but {recorded} records (a kernel without pdl_entry?)\n",
                log.launches
            );
        }
        let word = |bytes: &[u8], index: usize| -> u64 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[8 * index..8 * index + 8]);
            u64::from_le_bytes(b)
        };
        let release = |i: usize| word(&ring, 2 * (i % CAPACITY) + 1) as f64 / 1000.0;
        // Mark k of launch i, in µs after its release (None: block (0, 0, 0) did not pass it).
        let mark = |i: usize, k: usize| {
            let t = word(&marks, MARKS * (i % CAPACITY) + k);
            (t != 0).then(|| t as f64 / 1000.0 - release(i))
        };
        let steps = log.steps.min(STEP_RING);
        if steps < 2 {
            return "launch trace: fewer than two steps\n".to_string();
        }
        let start_of = |k: usize| log.step_starts[(log.steps - 1 - k) % STEP_RING];
        // Complete steps, newest first: (start, end); the last step has no successor, so the
        // newest complete one is the one before it.
        let last_len = start_of(0) - start_of(1);
        let mut spans = Vec::new();
        for k in 1..steps {
            let (start, end) = (start_of(k), start_of(k - 1));
            if end - start != last_len || log.launches - start > CAPACITY || spans.len() == 32 {
                break;
            }
            spans.push((start, end));
        }
        let label = |i: usize| {
            let (name, (x, y, z)) = log.names[i % CAPACITY];
            format!("{name} ({x},{y},{z})")
        };
        let mut per_kernel: HashMap<String, (usize, f64)> = HashMap::new();
        let mut phases: HashMap<String, [(usize, f64); MARKS]> = HashMap::new();
        let mut order: Vec<(String, f64)> = Vec::new();
        let mut step_us = 0.0;
        for (n, &(start, end)) in spans.iter().enumerate() {
            step_us += release(end) - release(start);
            for i in start..end {
                let share = release(i + 1) - release(i);
                let e = per_kernel.entry(label(i)).or_default();
                e.0 += 1;
                e.1 += share;
                let p = phases.entry(label(i)).or_default();
                for (k, slot) in p.iter_mut().enumerate().skip(1) {
                    if let Some(us) = mark(i, k) {
                        slot.0 += 1;
                        slot.1 += us;
                    }
                }
                if n == 0 && i - start < 32 {
                    order.push((log.names[i % CAPACITY].0.to_string(), share));
                }
            }
        }
        let steps_used = spans.len().max(1) as f64;
        let mut rows: Vec<_> = per_kernel.into_iter().collect();
        rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
        let mut text = format!(
            "CUDA launch trace: {} steps of {last_len} launches, {:.1} µs a step \
             (wait release to wait release; the last launch of a step includes the host's gap)\n",
            spans.len(),
            step_us / steps_used
        );
        for (name, (launches, us)) in rows {
            let _ = writeln!(
                text,
                "  {name:<40} {:>6.1} launches {:>9.1} µs a step {:>7.2} µs each",
                launches as f64 / steps_used,
                us / steps_used,
                us / launches.max(1) as f64
            );
            let marks: Vec<String> = phases[&name]
                .iter()
                .enumerate()
                .filter(|(_, p)| p.0 > 0)
                .map(|(k, p)| format!("{k}: {:.2}", p.1 / p.0 as f64))
                .collect();
            if !marks.is_empty() {
                let _ = writeln!(text, "      marks (µs after release): {}", marks.join(", "));
            }
        }
        text.push_str("  first launches of the newest step (µs):");
        for (name, us) in order {
            let _ = write!(text, " {name} {us:.1};");
        }
        text.push('\n');
        text
    }
}
