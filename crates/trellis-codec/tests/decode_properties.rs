//! The decoder against an independent, deliberately naive implementation written from the
//! format description: bit-by-bit stream reading, the shift recursion instead of windows,
//! and codebooks evaluated with plain f64 arithmetic.

use half::f16;
use proptest::prelude::*;
use trellis_codec::tile::{decode_tile, tile_states};
use trellis_codec::{BitWidth, Codebook};

/// Bit `b` of the tile stream: MSB-first within little-endian u32 words.
fn stream_bit(words: &[u16], b: usize) -> u32 {
    let word = u32::from(words[2 * (b / 32)]) | (u32::from(words[2 * (b / 32) + 1]) << 16);
    (word >> (31 - b % 32)) & 1
}

/// Bits added at position `t`.
fn added_bits(bits: BitWidth, t: usize) -> usize {
    let whole = bits.as_f64().floor() as usize;
    if bits.as_f64().fract() == 0.0 {
        whole
    } else {
        whole + ((0xAAAA >> (t % 16)) & 1)
    }
}

/// States by the recursion `s_t = (s_{t-1} << D(t) | code_t) & 0xFFFF`, run twice around the
/// ring so that the first states see the ring's tail.
fn naive_states(words: &[u16], bits: BitWidth) -> Vec<u16> {
    let mut codes = Vec::new();
    let mut pos = 0;
    for t in 0..256 {
        let d = added_bits(bits, t);
        let mut code = 0u32;
        for _ in 0..d {
            code = (code << 1) | stream_bit(words, pos);
            pos += 1;
        }
        codes.push((d, code));
    }
    assert_eq!(pos, words.len() * 16, "codes fill the tile exactly");
    let mut state = 0u32;
    let mut out = vec![0u16; 256];
    for lap in 0..2 {
        for (t, &(d, code)) in codes.iter().enumerate() {
            state = ((state << d) | code) & 0xFFFF;
            if lap == 1 {
                out[t] = state as u16;
            }
        }
    }
    out
}

fn naive_codebook(cb: Codebook, s: u16) -> f16 {
    let s = u64::from(s);
    let halves = |x: u64| {
        let x = (x & 0x8FFF_8FFF) ^ 0x3B60_3B60;
        f16::from_bits((x & 0xFFFF) as u16).to_f64() + f16::from_bits((x >> 16) as u16).to_f64()
    };
    let v = match cb {
        Codebook::Inst3 => halves((s * 89_226_354 + 64_248_484) % (1 << 32)),
        Codebook::Mcg => halves((s * 0xCBAC_1FED) % (1 << 32)),
        Codebook::Mul1 => {
            let x = (s * 0x83DC_D12D) % (1 << 32);
            let sum: u64 = (0..4).map(|i| (x >> (8 * i)) & 0xFF).sum();
            (1024.0 + sum as f64) * f16::from_bits(0x1EEE).to_f64()
                + f16::from_bits(0xC931).to_f64()
        }
    };
    f16::from_f64(v)
}

/// (row, column) of position t, from the lane description of the format.
fn naive_row_col(t: usize) -> (usize, usize) {
    let lane = t / 8;
    let rows = [0, 1, 8, 9, 0, 1, 8, 9];
    let cols = [0, 0, 0, 0, 8, 8, 8, 8];
    (2 * (lane % 4) + rows[t % 8], lane / 4 + cols[t % 8])
}

fn width_and_codebook() -> impl Strategy<Value = (BitWidth, Codebook)> {
    (0..BitWidth::ALL.len(), 0..3usize).prop_map(|(w, c)| {
        let bits = BitWidth::ALL[w];
        // Half-integer widths exist only with mul1.
        let cb = if bits.is_integer() {
            Codebook::ALL[c]
        } else {
            Codebook::Mul1
        };
        (bits, cb)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn decoder_matches_naive_implementation(
        (bits, cb) in width_and_codebook(),
        seed_words in proptest::collection::vec(any::<u16>(), 128),
    ) {
        let words = &seed_words[..bits.tile_words()];
        let states = tile_states(words, bits);
        let naive = naive_states(words, bits);
        prop_assert_eq!(&states[..], &naive[..]);
        let tile = decode_tile(words, bits, cb);
        for (t, &s) in naive.iter().enumerate() {
            let (r, c) = naive_row_col(t);
            prop_assert_eq!(tile[r * 16 + c].to_bits(), naive_codebook(cb, s).to_bits(), "t={} K={}", t, bits);
        }
    }
}

/// Every state of every codebook, not just the sampled ones.
#[test]
fn codebooks_match_naive_over_all_states() {
    for cb in Codebook::ALL {
        for s in 0..=u16::MAX {
            assert_eq!(
                cb.decode(s).to_bits(),
                naive_codebook(cb, s).to_bits(),
                "{cb:?} state {s:#x}"
            );
        }
    }
}
