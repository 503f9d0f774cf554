//! Optional per-op timing of the CPU backend (`TRELLIS_CPU_PROFILE=1`): wall time and calls
//! per op name and shape (`in`/`out` features for linears, the number of linears for a
//! batch), split into one-row (decode) and many-row (prefill) calls, printed
//! to stderr when the backend is dropped. Fixed slots, atomics only: nothing is allocated or
//! locked per op.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

const SLOTS: usize = 64;

struct Slot {
    /// `name index << 40 | in << 20 | out`, plus 1 so that 0 means free; bit 63: many rows.
    key: AtomicU64,
    nanos: AtomicU64,
    calls: AtomicU64,
}

static TABLE: [Slot; SLOTS] = [const {
    Slot {
        key: AtomicU64::new(0),
        nanos: AtomicU64::new(0),
        calls: AtomicU64::new(0),
    }
}; SLOTS];

/// Op names, indexed by the `name` argument of [`timed`].
pub const NAMES: [&str; 9] = [
    "embed",
    "rms_norm",
    "linear",
    "linear_batch",
    "mla_append",
    "mla_attention",
    "moe_route",
    "moe_experts",
    "moe_block",
];

pub const EMBED: usize = 0;
pub const RMS_NORM: usize = 1;
pub const LINEAR: usize = 2;
pub const LINEAR_BATCH: usize = 3;
pub const MLA_APPEND: usize = 4;
pub const MLA_ATTENTION: usize = 5;
pub const MOE_ROUTE: usize = 6;
pub const MOE_EXPERTS: usize = 7;
pub const MOE_BLOCK: usize = 8;

/// Whether `TRELLIS_CPU_PROFILE` asks for timings (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TRELLIS_CPU_PROFILE").is_ok_and(|v| v != "0"))
}

/// Time `f` under `name` (an index into [`NAMES`]) and shape.
#[inline]
pub fn timed<R>(name: usize, in_f: usize, out_f: usize, rows: usize, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let start = Instant::now();
    let r = f();
    let nanos = start.elapsed().as_nanos() as u64;
    let key = (((name as u64) << 40) | ((in_f as u64 & 0xFFFFF) << 20) | (out_f as u64 & 0xFFFFF))
        + 1
        + (u64::from(rows > 1) << 63);
    for slot in &TABLE {
        let k = slot.key.load(Ordering::Relaxed);
        if k == key
            || (k == 0
                && slot
                    .key
                    .compare_exchange(0, key, Ordering::Relaxed, Ordering::Relaxed)
                    .map_or_else(|found| found == key, |_| true))
        {
            slot.nanos.fetch_add(nanos, Ordering::Relaxed);
            slot.calls.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    r
}

/// The table so far, largest total first; empty after the first call (several backends in
/// one process share the table, and it is printed once).
pub fn report() -> String {
    static PRINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if PRINTED.swap(true, Ordering::Relaxed) {
        return String::new();
    }
    let mut rows: Vec<(u64, String)> = TABLE
        .iter()
        .filter(|s| s.key.load(Ordering::Relaxed) != 0)
        .map(|s| {
            let key = s.key.load(Ordering::Relaxed);
            let many = key >> 63 == 1;
            let key = (key & !(1 << 63)) - 1;
            let name = NAMES[(key >> 40) as usize];
            let (in_f, out_f) = ((key >> 20) & 0xFFFFF, key & 0xFFFFF);
            let nanos = s.nanos.load(Ordering::Relaxed);
            let calls = s.calls.load(Ordering::Relaxed);
            (
                nanos,
                format!(
                    "{:<8} {name:<14} {in_f:>7} {out_f:>7} {calls:>8} calls {:>10.1} ms {:>9.1} us/call",
                    if many { "prefill" } else { "decode" },
                    nanos as f64 / 1e6,
                    nanos as f64 / 1e3 / calls.max(1) as f64
                ),
            )
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    rows.into_iter().map(|r| r.1 + "\n").collect()
}
