//! Throughput of the CPU trellis kernels on GLM-4.7-Flash linear shapes.
//!
//! ```text
//! cargo run --release -p trellis-backend --example trellis_gemv -- \
//!     [--threads N] [--isa scalar,avx2,avx2int16,avx512,avx512fp16,avx512vnni]
//!     [--rows 1,256] [--bits 3,4] [--codebooks mul1,mcg] [--shapes expert_gate_up,...]
//!     [--seconds S] [--cold-mb MB]
//! ```
//!
//! `avx512vnni` and `avx2int16` differ from the exact levels below them only on mul1 products
//! (activations quantized to int16, see `trellis_kernels`; `TRELLIS_CPU_AMX=0` keeps
//! `avx512vnni`'s many-row products off the AMX tiles); elsewhere they run the same exact
//! kernels.
//!
//! One line per (shape, K, codebook, rows, level): best and median time per call, and from
//! the best, weight bytes read per second (the packed trellis plus scales) and weights decoded
//! per second (k·n/time; with rows > 1 each decoded weight is used by every row).
//!
//! By default one copy of each linear is timed, so after the first call its weights come from
//! the caches (the L3 here is 260 MB). `--cold-mb MB` cycles through enough copies to exceed
//! MB megabytes, so that the weights stream from DRAM as in a model's decode step.

use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::borrow::Cow;
use std::time::Instant;
use trellis_backend::cpu::trellis_kernels::{Isa, PackedTrellis, forward_with};
use trellis_codec::{BitWidth, Codebook, TrellisLinear};

/// (name, in, out, fixed K): GLM-4.7-Flash's linears; the head is always 6 bits.
const SHAPES: [(&str, usize, usize, Option<u32>); 7] = [
    // Not in GLM: small enough that the time per call is the op's fixed overhead.
    ("tiny", 128, 128, None),
    ("expert_gate_up", 2048, 1536, None),
    ("expert_down", 1536, 2048, None),
    ("q_a", 2048, 768, None),
    ("q_b", 768, 5120, None),
    ("o_proj", 5120, 2048, None),
    ("lm_head", 2048, 154_880, Some(6)),
];

fn list<T>(args: &[String], flag: &str, parse: impl Fn(&str) -> T) -> Option<Vec<T>> {
    let i = args.iter().position(|a| a == flag)?;
    Some(args[i + 1].split(',').map(parse).collect())
}

fn random_linear(
    rng: &mut StdRng,
    k: usize,
    n: usize,
    bits: BitWidth,
    cb: Codebook,
) -> TrellisLinear<'static> {
    let words: Vec<u16> = (0..(k / 16) * (n / 16) * bits.tile_words())
        .map(|_| rng.random())
        .collect();
    let scales = |rng: &mut StdRng, len: usize| -> Vec<f16> {
        (0..len)
            .map(|_| f16::from_f32(rng.random_range(-0.05f32..0.05)))
            .collect()
    };
    TrellisLinear::new(
        Cow::Owned(words),
        Cow::Owned(scales(rng, k)),
        Cow::Owned(scales(rng, n)),
        None,
        bits,
        cb,
        k,
        n,
    )
    .expect("valid shape")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads =
        list(&args, "--threads", |s| s.parse::<usize>().expect("threads")).map_or(0, |v| v[0]);
    trellis_backend::cpu::set_threads(threads, trellis_backend::cpu::OpsThread::This)
        .expect("thread pool");
    let isas = list(&args, "--isa", |s| Isa::from_name(s).expect("level name"))
        .unwrap_or_else(Isa::available);
    let rows_list =
        list(&args, "--rows", |s| s.parse::<usize>().expect("rows")).unwrap_or(vec![1, 256]);
    let bits_list =
        list(&args, "--bits", |s| s.parse::<u32>().expect("bits")).unwrap_or(vec![3, 4]);
    let codebooks = list(&args, "--codebooks", |s| {
        Codebook::from_name(s).expect("codebook")
    })
    .unwrap_or(vec![Codebook::Mul1, Codebook::Mcg]);
    let shapes = list(&args, "--shapes", str::to_string);
    let seconds =
        list(&args, "--seconds", |s| s.parse::<f64>().expect("seconds")).map_or(0.5, |v| v[0]);
    let cold_mb = list(&args, "--cold-mb", |s| s.parse::<f64>().expect("MB")).map_or(0.0, |v| v[0]);
    println!(
        "threads {}  levels {:?}  cold {} MB",
        rayon::current_num_threads(),
        isas.iter().map(|i| i.name()).collect::<Vec<_>>(),
        cold_mb
    );
    println!(
        "{:<15} {:>6} {:>7} {:>3} {:>5} {:>4} {:>11} {:>10} {:>10} {:>8} {:>9}",
        "shape",
        "in",
        "out",
        "K",
        "cb",
        "rows",
        "level",
        "best ms",
        "median ms",
        "GB/s",
        "Gweight/s"
    );
    let mut rng = StdRng::seed_from_u64(1);
    for &(name, k, n, fixed_bits) in &SHAPES {
        let wanted = match &shapes {
            Some(list) => list.iter().any(|s| s == name),
            None => name != "tiny",
        };
        if !wanted {
            continue;
        }
        let widths: Vec<u32> = fixed_bits.map_or(bits_list.clone(), |b| vec![b]);
        for &bits in &widths {
            for &cb in &codebooks {
                let t = random_linear(&mut rng, k, n, BitWidth::integer(bits).expect("K"), cb);
                let copies = (cold_mb * 1e6 / t.storage_bytes() as f64).ceil().max(1.0) as usize;
                let packed: Vec<PackedTrellis> =
                    (0..copies).map(|_| PackedTrellis::new(&t)).collect();
                drop(t);
                for &rows in &rows_list {
                    if rows > 1 && name == "lm_head" {
                        // Models run the head on the last row only.
                        continue;
                    }
                    let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let mut out = vec![0.0f32; rows * n];
                    for &isa in &isas {
                        forward_with(&packed[0], isa, &x, rows, &mut out);
                        let mut times = Vec::new();
                        let start = Instant::now();
                        while times.len() < 3 || start.elapsed().as_secs_f64() < seconds {
                            let p = &packed[(times.len() + 1) % copies];
                            let t0 = Instant::now();
                            forward_with(p, isa, &x, rows, &mut out);
                            times.push(t0.elapsed().as_secs_f64());
                        }
                        times.sort_by(f64::total_cmp);
                        // The machine is shared: the best time is the kernel's own speed, the
                        // median what it got; rates are from the best.
                        let (best, median) = (times[0], times[times.len() / 2]);
                        println!(
                            "{:<15} {:>6} {:>7} {:>3} {:>5} {:>4} {:>11} {:>10.4} {:>10.4} {:>8.2} {:>9.2}",
                            name,
                            k,
                            n,
                            bits,
                            cb.name(),
                            rows,
                            isa.name(),
                            best * 1e3,
                            median * 1e3,
                            packed[0].stored_bytes as f64 / best / 1e9,
                            (k * n) as f64 / best / 1e9,
                        );
                    }
                }
            }
        }
    }
}
