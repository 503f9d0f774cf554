//! The layout EXL3 trellis weights are repacked into at upload, and the per-width tables
//! that say where each trellis position's 16-bit state lies in it.
//!
//! **Stream layout.** Tiles are stored strip by strip: a *strip* is the 16 output columns of
//! one tile column `nt`, and its `tiles_k` tiles (kt = 0, 1, …) follow each other, so a kernel
//! computing 16 outputs streams one contiguous run of memory. Each tile's 8·K little-endian
//! u32 words are stored byte-swapped, i.e. as the tile's bitstream in stream order (stream
//! byte m = bits 8m…8m+7, most significant first). Then the window of any position starts at a
//! plain byte offset, and the bytes of 32 consecutive positions lie inside one 64-byte load.
//! The buffer has `STREAM_PAD` readable bytes before the first and after the last tile so
//! that whole-vector loads near the ends stay inside it. Memory is the file's trellis size
//! plus 128 bytes.
//!
//! **Groups.** Trellis positions 32g … 32g+31 of a tile (g = 0…7) are exactly the 16 rows of
//! output columns g and g+8 (the tensor-core order of the format, §5.2), and consume 32·K
//! bits = 4·K bytes. Loading 64 bytes from stream byte `4gK − 2` therefore gives every group
//! the same relative picture: position p of the group has its window start at bit
//! `S(p)` of the load (S = `BitWidth::stream_end`). Group 0's first two bytes are the ring's
//! last two bytes (the trellis is tail-biting), which kernels take from the tile's end.

use trellis_codec::hadamard::HADAMARD_SCALE;
use trellis_codec::{BitWidth, Codebook, TrellisLinear};

use rayon::prelude::*;
use std::sync::OnceLock;

/// Readable bytes before the first and after the last tile of a packed stream.
pub const STREAM_PAD: usize = 64;
/// Output columns per strip (= tile width).
pub const STRIP: usize = 16;
/// Trellis positions per group: the 16 rows of two output columns.
pub const GROUP: usize = 32;
/// Groups per tile.
pub const GROUPS: usize = 8;

/// Rows of a tile in *chunk order*: the rows of trellis positions 8c … 8c+3 (one column),
/// which are rows 2c, 2c+1, 2c+8, 2c+9, for c = 0..4. SIMD kernels keep each column's rows in
/// this order because four consecutive positions then share one small window of the stream.
pub const CHUNK_ROW_ORDER: [usize; STRIP] = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15];

/// Position (0..32) inside a group of row `CHUNK_ROW_ORDER[i]` of column g (`half` 0) or
/// g+8 (`half` 1).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub const fn chunk_order_position(half: usize, i: usize) -> usize {
    8 * (i / 4) + 4 * half + i % 4
}

/// An EXL3 linear repacked for the CPU kernels (see the module documentation).
pub struct PackedTrellis {
    pub bits: BitWidth,
    pub codebook: Codebook,
    pub in_features: usize,
    pub out_features: usize,
    pub k_padded: usize,
    pub n_padded: usize,
    /// Bytes of one tile (32·K).
    pub tile_bytes: usize,
    stream: Vec<u8>,
    /// `suh` widened to f32 with the input Hadamard's 1/√128 folded in.
    pub suh_scaled: Vec<f32>,
    /// `svh` widened to f32 with the output Hadamard's 1/√128 folded in.
    pub svh_scaled: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    /// Bytes of the tensors as stored in the file (what one evaluation reads there).
    pub stored_bytes: usize,
}

impl PackedTrellis {
    /// Repack a linear (usually borrowed from the memory map) into kernel layout.
    pub fn new(t: &TrellisLinear<'_>) -> PackedTrellis {
        let tile_bytes = 2 * t.bits.tile_words();
        let (tiles_k, tiles_n) = (t.tiles_k(), t.tiles_n());
        let mut stream = vec![0u8; 2 * STREAM_PAD + tiles_k * tiles_n * tile_bytes];
        // Tasks own runs of whole strips; inside, the source (tile rows kt, usually the memory
        // map) is read row by row so that each task reads contiguous runs of it.
        let strips_per_task = tiles_n.div_ceil(4 * rayon::current_num_threads()).max(1);
        stream[STREAM_PAD..STREAM_PAD + tiles_k * tiles_n * tile_bytes]
            .par_chunks_mut(strips_per_task * tiles_k * tile_bytes)
            .enumerate()
            .for_each(|(task, strips)| {
                let first = task * strips_per_task;
                for kt in 0..tiles_k {
                    for (s, strip) in strips.chunks_exact_mut(tiles_k * tile_bytes).enumerate() {
                        let tile = &mut strip[kt * tile_bytes..(kt + 1) * tile_bytes];
                        let words = t.tile_words(kt, first + s);
                        for (bytes, pair) in tile.chunks_exact_mut(4).zip(words.chunks_exact(2)) {
                            let u = u32::from(pair[0]) | (u32::from(pair[1]) << 16);
                            bytes.copy_from_slice(&u.to_be_bytes());
                        }
                    }
                }
            });
        PackedTrellis {
            bits: t.bits,
            codebook: t.codebook,
            in_features: t.in_features,
            out_features: t.out_features,
            k_padded: t.k_padded,
            n_padded: t.n_padded,
            tile_bytes,
            stream,
            suh_scaled: t.suh.iter().map(|v| v.to_f32() * HADAMARD_SCALE).collect(),
            svh_scaled: t.svh.iter().map(|v| v.to_f32() * HADAMARD_SCALE).collect(),
            bias: t
                .bias
                .as_ref()
                .map(|b| b.iter().map(|v| v.to_f32()).collect()),
            stored_bytes: t.storage_bytes(),
        }
    }

    pub fn tiles_k(&self) -> usize {
        self.k_padded / STRIP
    }

    /// Strips (16-column tile columns).
    pub fn strips(&self) -> usize {
        self.n_padded / STRIP
    }

    /// Byte offset in `stream()` of tile `kt` of strip `strip`.
    #[inline]
    pub fn tile_offset(&self, strip: usize, kt: usize) -> usize {
        STREAM_PAD + (strip * self.tiles_k() + kt) * self.tile_bytes
    }

    /// The whole packed buffer, pads included.
    #[inline]
    pub fn stream(&self) -> &[u8] {
        &self.stream
    }

    /// Bytes this layer holds in memory.
    pub fn resident_bytes(&self) -> usize {
        self.stream.len()
            + 4 * (self.suh_scaled.len()
                + self.svh_scaled.len()
                + self.bias.as_ref().map_or(0, Vec::len))
    }
}

/// Where the window of each position of a group starts in the group's 64-byte load (which
/// begins 16 bits before the group's first code bit): bit `S(p)`, for one bit width.
pub struct GroupTables {
    pub start_byte: [u8; GROUP],
    pub start_bit: [u8; GROUP],
}

impl GroupTables {
    fn compute(bits: BitWidth) -> GroupTables {
        let mut t = GroupTables {
            start_byte: [0; GROUP],
            start_bit: [0; GROUP],
        };
        for p in 0..GROUP {
            let start = bits.stream_end(p) as usize;
            t.start_byte[p] = (start / 8) as u8;
            t.start_bit[p] = (start % 8) as u8;
        }
        t
    }

    /// The tables of `bits` (shared, computed on first use).
    pub fn of(bits: BitWidth) -> &'static GroupTables {
        static TABLES: PerWidth<GroupTables> = per_width_cache();
        per_width(&TABLES, bits, GroupTables::compute)
    }
}

/// A kernel's table for each bit width, computed on first use ([`per_width`]).
pub type PerWidth<T> = [OnceLock<T>; BitWidth::ALL.len()];

/// An empty [`PerWidth`] cache, for a `static`.
pub const fn per_width_cache<T>() -> PerWidth<T> {
    [const { OnceLock::new() }; BitWidth::ALL.len()]
}

/// The entry of `bits` in `cache`, computed by `compute` the first time it is asked for.
pub fn per_width<T>(
    cache: &'static PerWidth<T>,
    bits: BitWidth,
    compute: fn(BitWidth) -> T,
) -> &'static T {
    let index = BitWidth::ALL
        .iter()
        .position(|&w| w == bits)
        .expect("every width is listed");
    cache[index].get_or_init(|| compute(bits))
}

/// Bytes a group advances by in the stream (4·K; an integer for every width).
#[inline]
pub fn group_stride(tile_bytes: usize) -> usize {
    tile_bytes / GROUPS
}

/// The state of position `p` of group `g` of the tile starting at `tile` (a slice of the
/// packed stream from the tile's first byte to the end): a plain reading of the layout,
/// for the scalar kernel and tests.
#[inline]
pub fn position_state(
    tile: &[u8],
    tile_bytes: usize,
    tables: &GroupTables,
    g: usize,
    p: usize,
) -> u16 {
    // Byte `i` of the group's load, with the ring closing for group 0's first two bytes.
    let byte = |i: usize| -> u32 {
        let pos = g * group_stride(tile_bytes) + i;
        let pos = if pos < 2 { pos + tile_bytes } else { pos } - 2;
        u32::from(tile[pos])
    };
    let b = usize::from(tables.start_byte[p]);
    let window = (byte(b) << 16) | (byte(b + 1) << 8) | byte(b + 2);
    ((window >> (8 - tables.start_bit[p])) & 0xFFFF) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_codec::tile::{POSITION_TO_TILE_INDEX, position_to_row_col, tile_states};

    #[test]
    fn groups_are_two_columns_in_chunk_row_order() {
        for g in 0..GROUPS {
            for half in 0..2 {
                for (i, &row) in CHUNK_ROW_ORDER.iter().enumerate() {
                    let p = GROUP * g + chunk_order_position(half, i);
                    assert_eq!(position_to_row_col(p), (row, g + 8 * half), "g {g} {i}");
                }
            }
        }
        assert_eq!(POSITION_TO_TILE_INDEX.len(), GROUPS * GROUP);
    }

    #[test]
    fn position_states_match_the_codec() {
        let mut seed = 0x1234_5678_9ABC_DEF0u64;
        for bits in BitWidth::ALL {
            let words: Vec<u16> = (0..bits.tile_words())
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 48) as u16
                })
                .collect();
            let want = tile_states(&words, bits);
            let tile_bytes = 2 * bits.tile_words();
            // One byte more than the tile: the last window's third byte lies past it (unused).
            let mut tile = vec![0u8; tile_bytes + 1];
            for (bytes, pair) in tile.chunks_exact_mut(4).zip(words.chunks_exact(2)) {
                let u = u32::from(pair[0]) | (u32::from(pair[1]) << 16);
                bytes.copy_from_slice(&u.to_be_bytes());
            }
            let tables = GroupTables::of(bits);
            for g in 0..GROUPS {
                for p in 0..GROUP {
                    assert_eq!(
                        position_state(&tile, tile_bytes, tables, g, p),
                        want[GROUP * g + p],
                        "K {bits} g {g} position {p}"
                    );
                }
            }
        }
    }
}
