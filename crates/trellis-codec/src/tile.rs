//! One 16×16 tile: the packed bitstream, its 256 trellis states, and the tensor-core
//! position order that maps trellis positions to (row, column) inside the tile.

use crate::bits::{BitWidth, STATE_BITS, TILE_WEIGHTS};
use crate::codebook::Codebook;
use half::f16;
use std::sync::OnceLock;

/// Rows and columns of a tile.
pub const TILE_SIZE: usize = 16;

/// (input row, output column) inside the tile of trellis position `t`.
///
/// Positions are ordered so that GPU lane `t / 8` decodes exactly its two `mma.m16n8k16`
/// B fragments: rows r0, r0+1, r0+8, r0+9 of column c0, then the same rows of column c0+8.
#[inline]
pub const fn position_to_row_col(t: usize) -> (usize, usize) {
    let lane = t / 8;
    let j = t % 8;
    let r0 = 2 * (lane % 4);
    let c0 = lane / 4;
    (r0 + (j & 1) + 8 * ((j >> 1) & 1), c0 + 8 * (j >> 2))
}

/// For every trellis position, its index in the row-major 16×16 tile (`row * 16 + col`).
pub const POSITION_TO_TILE_INDEX: [u8; TILE_WEIGHTS] = {
    let mut table = [0u8; TILE_WEIGHTS];
    let mut t = 0;
    while t < TILE_WEIGHTS {
        let (r, c) = position_to_row_col(t);
        table[t] = (r * TILE_SIZE + c) as u8;
        t += 1;
    }
    table
};

/// Where each position's 16-bit state window lies in a tile of one bit width: the u32 words
/// holding its first and last bit and the right shift that aligns it. Computed once per width.
pub struct StateWindows {
    first: [u8; TILE_WEIGHTS],
    last: [u8; TILE_WEIGHTS],
    shift: [u8; TILE_WEIGHTS],
}

impl StateWindows {
    fn compute(bits: BitWidth) -> StateWindows {
        let ring = bits.ring_bits();
        let n_u32 = bits.tile_u32_words() as u32;
        let mut w = StateWindows {
            first: [0; TILE_WEIGHTS],
            last: [0; TILE_WEIGHTS],
            shift: [0; TILE_WEIGHTS],
        };
        for t in 0..TILE_WEIGHTS {
            // Window [end − 16, end) of the ring, shifted by one ring length to stay non-negative.
            let start = bits.stream_end(t) + ring - STATE_BITS;
            let end = start + STATE_BITS;
            let first = start / 32;
            let last = (end - 1) / 32;
            w.first[t] = (first % n_u32) as u8;
            w.last[t] = (last % n_u32) as u8;
            w.shift[t] = ((last + 1) * 32 - end) as u8;
        }
        w
    }

    /// The windows of `bits` (shared, computed on first use).
    pub fn of(bits: BitWidth) -> &'static StateWindows {
        static TABLES: [OnceLock<StateWindows>; 11] = [const { OnceLock::new() }; 11];
        let index = BitWidth::ALL
            .iter()
            .position(|&w| w == bits)
            .expect("every width is listed");
        TABLES[index].get_or_init(|| StateWindows::compute(bits))
    }

    /// States of one tile whose words are given as little-endian u32s.
    #[inline]
    pub fn states(&self, u32_words: &[u32], out: &mut [u16; TILE_WEIGHTS]) {
        for (t, state) in out.iter_mut().enumerate() {
            let hi = u64::from(u32_words[usize::from(self.first[t])]);
            let lo = u64::from(u32_words[usize::from(self.last[t])]);
            // When the window lies inside one word, hi == lo and the shift selects it directly,
            // since the shift is then below 32 and the high copy is shifted out by the u16 cut.
            *state = ((((hi << 32) | lo) >> self.shift[t]) & 0xFFFF) as u16;
        }
    }
}

/// A tile's int16 words as the little-endian u32 words its bitstream is read from.
#[inline]
pub fn tile_u32_words(words: &[u16], out: &mut [u32]) {
    for (u, pair) in out.iter_mut().zip(words.chunks_exact(2)) {
        *u = u32::from(pair[0]) | (u32::from(pair[1]) << 16);
    }
}

/// The 16-bit state of every trellis position of one tile.
///
/// `words` holds the tile's 16·K int16 words as stored (`trellis[kt, nt, :]`). The state of
/// position t is the circular 16-bit window of the MSB-first bitstream that ends where the
/// codes of positions 0..=t end; the ring closes, so the first states borrow their high bits
/// from the end of the tile.
pub fn tile_states(words: &[u16], bits: BitWidth) -> [u16; TILE_WEIGHTS] {
    assert_eq!(
        words.len(),
        bits.tile_words(),
        "tile word count for K = {bits}"
    );
    let mut u32s = [0u32; 64];
    tile_u32_words(words, &mut u32s);
    let mut states = [0u16; TILE_WEIGHTS];
    StateWindows::of(bits).states(&u32s[..bits.tile_u32_words()], &mut states);
    states
}

/// Decode one tile into a row-major 16×16 block of fp16 weights (row = input channel).
pub fn decode_tile(words: &[u16], bits: BitWidth, codebook: Codebook) -> [f16; TILE_WEIGHTS] {
    let table = codebook.table();
    let states = tile_states(words, bits);
    let mut out = [f16::ZERO; TILE_WEIGHTS];
    for (t, &s) in states.iter().enumerate() {
        out[usize::from(POSITION_TO_TILE_INDEX[t])] = table[usize::from(s)];
    }
    out
}

/// Pack 256 trellis states back into the tile's int16 words.
///
/// Only the code bits of each state (its low `code_bits(t)` bits) are stored; the states must
/// form a valid tail-biting walk (each state's high bits are the previous state's low bits,
/// with the ring closing from position 255 to 0) for `tile_states` to return them again.
pub fn pack_states(states: &[u16; TILE_WEIGHTS], bits: BitWidth) -> Vec<u16> {
    let n_u32 = bits.tile_u32_words();
    let mut u32s = vec![0u32; n_u32];
    let mut pos = 0u32;
    for (t, &s) in states.iter().enumerate() {
        let width = bits.code_bits(t);
        let code = u32::from(s) & ((1u32 << width) - 1);
        // Write `width` bits MSB-first starting at stream bit `pos`.
        for b in 0..width {
            let bit = (code >> (width - 1 - b)) & 1;
            let p = pos + b;
            u32s[(p / 32) as usize] |= bit << (31 - (p % 32));
        }
        pos += width;
    }
    let mut words = Vec::with_capacity(2 * n_u32);
    for u in u32s {
        words.push(u as u16);
        words.push((u >> 16) as u16);
    }
    words
}

/// True when the states form a tail-biting bitshift walk: every state's high bits are the
/// previous state's low bits, with position 255 preceding position 0.
pub fn is_valid_walk(states: &[u16; TILE_WEIGHTS], bits: BitWidth) -> bool {
    (0..TILE_WEIGHTS).all(|t| {
        let prev = states[(t + TILE_WEIGHTS - 1) % TILE_WEIGHTS];
        let shift = bits.code_bits(t);
        let expected_high = (u32::from(prev) << shift) & 0xFFFF;
        let high_mask = 0xFFFFu32 & !((1u32 << shift) - 1);
        (u32::from(states[t]) & high_mask) == expected_high
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_bijection() {
        let mut seen = [false; TILE_WEIGHTS];
        for &index in &POSITION_TO_TILE_INDEX {
            let i = usize::from(index);
            assert!(!seen[i], "tile index {i} hit twice");
            seen[i] = true;
        }
        // Lane 0 decodes rows 0, 1, 8, 9 of columns 0 and 8.
        let lane0: Vec<_> = (0..8).map(position_to_row_col).collect();
        assert_eq!(
            lane0,
            [
                (0, 0),
                (1, 0),
                (8, 0),
                (9, 0),
                (0, 8),
                (1, 8),
                (8, 8),
                (9, 8)
            ]
        );
        assert_eq!(position_to_row_col(8 * 5), (2, 1));
    }

    /// Worked example of the format reference (§6.3), K = 4.
    #[test]
    fn worked_example_k4() {
        let k = BitWidth::integer(4).unwrap();
        let mut words = vec![0u16; k.tile_words()];
        words[0] = 0x5678;
        words[1] = 0x1234;
        words[62] = 0xDEF0;
        words[63] = 0x9ABC;
        let s = tile_states(&words, k);
        assert_eq!(s[..5], [0xEF01, 0xF012, 0x0123, 0x1234, 0x2345]);
    }

    /// Worked example of the format reference (§6.4), K = 2.5.
    #[test]
    fn worked_example_k2_5() {
        let k = BitWidth::from_f64(2.5).unwrap();
        let mut words = vec![0u16; k.tile_words()];
        words[0] = 0x5678;
        words[1] = 0x1234;
        words[38] = 0xDEF0;
        words[39] = 0x9ABC;
        let s = tile_states(&words, k);
        assert_eq!(s[..6], [0x7BC0, 0xDE02, 0x7809, 0xC048, 0x0123, 0x091A]);
        let mul1: Vec<f64> = s[..6]
            .iter()
            .map(|&x| Codebook::Mul1.decode(x).to_f64())
            .collect();
        assert_eq!(
            mul1,
            [
                0.62744140625,
                -0.60400390625,
                -0.022125244140625,
                1.595703125,
                -0.299560546875,
                0.5732421875
            ]
        );
    }
}
