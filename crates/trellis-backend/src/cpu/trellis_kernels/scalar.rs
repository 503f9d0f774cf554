//! The reference kernel: plain Rust, states read byte by byte from the packed layout and
//! mapped through the codebook's exact f32 table. Every SIMD kernel is tested against it.

use super::layout::{GROUP, GROUPS, GroupTables, PackedTrellis, STRIP, position_state};
use trellis_codec::TILE_WEIGHTS;
use trellis_codec::tile::position_to_row_col;

/// Decode tile `kt` of `strip` into `wt[c * 16 + r]` (column-major, natural row order).
pub fn decode_tile(p: &PackedTrellis, strip: usize, kt: usize, wt: &mut [f32; TILE_WEIGHTS]) {
    let table = p.codebook.table_f32();
    let tables = GroupTables::of(p.bits);
    let tile = &p.stream()[p.tile_offset(strip, kt)..];
    for g in 0..GROUPS {
        for pos in 0..GROUP {
            let state = position_state(tile, p.tile_bytes, tables, g, pos);
            let (row, col) = position_to_row_col(GROUP * g + pos);
            wt[col * STRIP + row] = table[usize::from(state)];
        }
    }
}

/// [`decode_tile`] for tiles `kt0…` of `strip`, as many as `wt` holds.
pub fn decode_tiles(p: &PackedTrellis, strip: usize, kt0: usize, wt: &mut [f32]) {
    for (t, wt) in wt.chunks_exact_mut(TILE_WEIGHTS).enumerate() {
        decode_tile(p, strip, kt0 + t, wt.try_into().expect("one tile"));
    }
}

/// `z[s][c] = Σ_k xh[k] · W̃[k][16·strip + c]` for the strips of `strips`, `z` holding 16
/// values per strip.
pub fn gemv(p: &PackedTrellis, xh: &[f32], strips: std::ops::Range<usize>, z: &mut [f32]) {
    let mut wt = [0.0f32; TILE_WEIGHTS];
    for (strip, zs) in strips.zip(z.chunks_exact_mut(STRIP)) {
        zs.fill(0.0);
        for kt in 0..p.tiles_k() {
            decode_tile(p, strip, kt, &mut wt);
            let xs = &xh[kt * STRIP..(kt + 1) * STRIP];
            for (zc, col) in zs.iter_mut().zip(wt.chunks_exact(STRIP)) {
                *zc += col.iter().zip(xs).map(|(w, x)| w * x).sum::<f32>();
            }
        }
    }
}

/// `acc[row][c·16 + r] += Σ_t wt[t][c·16 + r] · input[row][16t + r]` (see
/// `super::accumulate_rows`).
pub fn accumulate_rows(
    wt: &[f32],
    tiles: usize,
    inputs: &[f32],
    input_stride: usize,
    acc: &mut [f32],
) {
    for (row, a) in acc.chunks_exact_mut(TILE_WEIGHTS).enumerate() {
        let input = &inputs[row * input_stride..];
        for t in 0..tiles {
            let x = &input[t * STRIP..(t + 1) * STRIP];
            let w = &wt[t * TILE_WEIGHTS..(t + 1) * TILE_WEIGHTS];
            for (a, w) in a.chunks_exact_mut(STRIP).zip(w.chunks_exact(STRIP)) {
                for ((a, &w), &x) in a.iter_mut().zip(w).zip(x) {
                    *a += w * x;
                }
            }
        }
    }
}
