//! The GPU Viterbi search (`CudaTileSearch`) against the CPU's exact search: the same walk for
//! every tile, at every width and codebook. Run on a GPU machine with
//! `cargo test -p trellis-cuda --test tile_search -- --ignored --test-threads 1`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::sync::OnceLock;
use std::time::Instant;
use trellis_codec::encode::{Effort, TileSearch, encode_tile, encode_tiles_with_effort};
use trellis_codec::tile::is_valid_walk;
use trellis_codec::{BitWidth, Codebook, TILE_WEIGHTS};
use trellis_cuda::CudaTileSearch;

fn search() -> &'static CudaTileSearch {
    static SEARCH: OnceLock<CudaTileSearch> = OnceLock::new();
    SEARCH.get_or_init(|| {
        let s = CudaTileSearch::new(0).expect("CUDA device 0 (these tests need an NVIDIA GPU)");
        eprintln!("tile search on {}", s.name());
        s
    })
}

/// Gaussian targets (Box–Muller) of standard deviation `sigma`, the shape of regularised
/// weights at the codebook's scale.
fn gaussian_tiles(rng: &mut StdRng, n: usize, sigma: f32) -> Vec<[f32; TILE_WEIGHTS]> {
    (0..n)
        .map(|_| {
            std::array::from_fn(|_| {
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                sigma * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
        })
        .collect()
}

/// Gaussian tiles plus ones that stress ties and ranges: all zeros (every walk through a
/// state repeats costs), a constant, huge values, and a tile of two levels.
fn test_tiles(seed: u64, n: usize) -> Vec<[f32; TILE_WEIGHTS]> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tiles = gaussian_tiles(&mut rng, n, 1.0);
    tiles.push([0.0; TILE_WEIGHTS]);
    tiles.push([0.25; TILE_WEIGHTS]);
    tiles.push(std::array::from_fn(
        |i| {
            if i % 3 == 0 { 3.0e3 } else { -1.0e3 }
        },
    ));
    tiles.push(std::array::from_fn(|i| if i < 128 { 1.0 } else { -1.0 }));
    tiles
}

fn assert_same_walks(what: &str, targets: &[[f32; TILE_WEIGHTS]], bits: BitWidth, cb: Codebook) {
    let got = search()
        .encode_tiles(targets, bits, cb)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(got.len(), targets.len(), "{what}: one tile per target");
    let want: Vec<_> = targets
        .par_iter()
        .map(|t| encode_tile(t, bits, cb))
        .collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            is_valid_walk(&g.states, bits),
            "{what}: tile {i} is not a closed walk"
        );
        assert_eq!(
            g.states, w.states,
            "{what}: tile {i} walks differ (GPU error {}, CPU {})",
            g.squared_error, w.squared_error
        );
        assert_eq!(g.words, w.words, "{what}: tile {i} words");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_search_finds_the_cpu_exact_walks_at_every_width_and_codebook() {
    for (i, &bits) in BitWidth::ALL.iter().enumerate() {
        for (j, &cb) in Codebook::ALL.iter().enumerate() {
            // Half-integer widths are written with mul1 only; the search does not depend on
            // the codebook, so one other is enough there.
            if !bits.is_integer() && cb == Codebook::Inst3 {
                continue;
            }
            let targets = test_tiles((i * 8 + j) as u64, 28);
            assert_same_walks(
                &format!("{} bits {}", bits.as_f64(), cb.name()),
                &targets,
                bits,
                cb,
            );
        }
    }
}

/// More tiles than the GPU runs at once, so that blocks loop over tiles and reuse their
/// scratch, and several calls that reuse (and grow) the search's buffers.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_search_loops_over_large_batches() {
    let bits = BitWidth::integer(4).unwrap();
    let targets = test_tiles(99, 5000);
    assert_same_walks("K 4 mul1, 5004 tiles", &targets, bits, Codebook::Mul1);
    assert_same_walks("K 4 mul1, 3 tiles", &targets[..3], bits, Codebook::Mul1);
    let two = BitWidth::integer(2).unwrap();
    assert_same_walks("K 2 mcg, 700 tiles", &targets[..700], two, Codebook::Mcg);
    assert!(
        search()
            .encode_tiles(&[], bits, Codebook::Mul1)
            .unwrap()
            .is_empty()
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_search_refuses_targets_it_cannot_search() {
    let bits = BitWidth::integer(3).unwrap();
    let mut bad = test_tiles(5, 2);
    bad[1][17] = f32::NAN;
    let err = search()
        .encode_tiles(&bad, bits, Codebook::Mcg)
        .unwrap_err();
    assert!(err.contains("NaN"), "{err}");
    bad[1][17] = 1e20;
    assert!(search().encode_tiles(&bad, bits, Codebook::Mcg).is_err());
}

/// Tiles per second of the GPU search and of the CPU's two efforts on this host (all cores),
/// for BENCHMARKS.md. Not a timed test: it only prints.
#[test]
#[ignore = "needs an NVIDIA GPU; prints timings"]
fn tile_search_throughput() {
    let mut rng = StdRng::seed_from_u64(7);
    let targets = gaussian_tiles(&mut rng, 16384, 1.0);
    let threads = rayon::current_num_threads();
    for k in [1u32, 2, 3, 4, 5, 6, 8] {
        let bits = BitWidth::integer(k).unwrap();
        let cb = Codebook::Mcg;
        search().encode_tiles(&targets[..64], bits, cb).unwrap();
        let gpu_tiles = &targets[..];
        let t = Instant::now();
        search().encode_tiles(gpu_tiles, bits, cb).unwrap();
        let gpu = gpu_tiles.len() as f64 / t.elapsed().as_secs_f64();
        // Strip-sized batches: what LDLQ asks for at a time on a 2048-column weight.
        let t = Instant::now();
        for strip in gpu_tiles[..2048].chunks(128) {
            search().encode_tiles(strip, bits, cb).unwrap();
        }
        let gpu_strips = 2048.0 / t.elapsed().as_secs_f64();
        let cpu_tiles = &targets[..(64 * threads).min(targets.len())];
        let t = Instant::now();
        encode_tiles_with_effort(cpu_tiles, bits, cb, Effort::Exact);
        let cpu_exact = cpu_tiles.len() as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        encode_tiles_with_effort(cpu_tiles, bits, cb, Effort::Fast);
        let cpu_fast = cpu_tiles.len() as f64 / t.elapsed().as_secs_f64();
        eprintln!(
            "K {k}: GPU {gpu:.0} tiles/s (16384 a call), {gpu_strips:.0} tiles/s (128 a call); \
             CPU {threads} threads exact {cpu_exact:.0}, fast {cpu_fast:.0} tiles/s"
        );
    }
}
