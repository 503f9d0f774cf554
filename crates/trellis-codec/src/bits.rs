//! Bits per weight of a trellis tensor: integer K = 1..8 or the half-integer 1.5 / 2.5 / 3.5.

use std::fmt;

/// Number of weights in one 16×16 tile, which is also the length of one trellis walk.
pub const TILE_WEIGHTS: usize = 256;
/// Width of the trellis state in bits (L in QTIP's notation).
pub const STATE_BITS: u32 = 16;

/// Bits per weight, stored as twice its value so that 2.5 is exact.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BitWidth {
    twice: u8,
}

impl BitWidth {
    /// Every width a decoder must accept, in increasing order.
    pub const ALL: [BitWidth; 11] = [
        BitWidth { twice: 2 },
        BitWidth { twice: 3 },
        BitWidth { twice: 4 },
        BitWidth { twice: 5 },
        BitWidth { twice: 6 },
        BitWidth { twice: 7 },
        BitWidth { twice: 8 },
        BitWidth { twice: 10 },
        BitWidth { twice: 12 },
        BitWidth { twice: 14 },
        BitWidth { twice: 16 },
    ];

    /// An integer width K = 1..=8.
    pub fn integer(k: u32) -> Option<BitWidth> {
        (1..=8).contains(&k).then(|| BitWidth {
            twice: (2 * k) as u8,
        })
    }

    /// Width from its value in bits (1..8, 1.5, 2.5 or 3.5); anything else is `None`.
    pub fn from_f64(bits: f64) -> Option<BitWidth> {
        let twice = bits * 2.0;
        if twice.fract() != 0.0 || !(2.0..=16.0).contains(&twice) {
            return None;
        }
        let w = BitWidth { twice: twice as u8 };
        w.is_valid().then_some(w)
    }

    /// Width implied by the last dimension of a `.trellis` tensor (16·K int16 words per tile).
    pub fn from_tile_words(words: usize) -> Option<BitWidth> {
        if !words.is_multiple_of(8) || words > 128 {
            return None;
        }
        let w = BitWidth {
            twice: (words / 8) as u8,
        };
        w.is_valid().then_some(w)
    }

    fn is_valid(self) -> bool {
        match self.twice {
            2..=16 if self.twice.is_multiple_of(2) => true,
            3 | 5 | 7 => true,
            _ => false,
        }
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.twice) / 2.0
    }

    pub fn as_f32(self) -> f32 {
        f32::from(self.twice) / 2.0
    }

    /// True for 1..8, false for 1.5 / 2.5 / 3.5.
    pub fn is_integer(self) -> bool {
        self.twice.is_multiple_of(2)
    }

    /// The integer part ⌊K⌋.
    pub fn floor(self) -> u32 {
        u32::from(self.twice / 2)
    }

    /// int16 words per tile (16·K).
    pub fn tile_words(self) -> usize {
        8 * usize::from(self.twice)
    }

    /// little-endian u32 words per tile (8·K).
    pub fn tile_u32_words(self) -> usize {
        4 * usize::from(self.twice)
    }

    /// Bits in one tile's ring (256·K).
    pub fn ring_bits(self) -> u32 {
        128 * u32::from(self.twice)
    }

    /// Bits that trellis position `i` (0..256) adds to the stream: K for integer widths;
    /// for half-integer widths ⌊K⌋ at even positions and ⌊K⌋+1 at odd ones.
    #[inline]
    pub fn code_bits(self, i: usize) -> u32 {
        if self.is_integer() {
            self.floor()
        } else {
            self.floor() + (i as u32 & 1)
        }
    }

    /// End (exclusive) of the stream bits consumed through position `i` inclusive: S(i).
    #[inline]
    pub fn stream_end(self, i: usize) -> u32 {
        let i = i as u32;
        if self.is_integer() {
            (i + 1) * self.floor()
        } else {
            // Positions 0..=i hold (i+1) codes of ⌊K⌋ bits plus one extra bit per odd position.
            (i + 1) * self.floor() + i.div_ceil(2)
        }
    }
}

impl fmt::Debug for BitWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BitWidth({self})")
    }
}

impl fmt::Display for BitWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_integer() {
            write!(f, "{}", self.floor())
        } else {
            write!(f, "{}.5", self.floor())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_parse_from_tile_words() {
        let words: Vec<usize> = BitWidth::ALL.iter().map(|w| w.tile_words()).collect();
        assert_eq!(words, [16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128]);
        for w in BitWidth::ALL {
            assert_eq!(BitWidth::from_tile_words(w.tile_words()), Some(w));
            assert_eq!(BitWidth::from_f64(w.as_f64()), Some(w));
        }
        for bad in [0, 8, 17, 72, 88, 104, 120, 136, 256] {
            assert_eq!(BitWidth::from_tile_words(bad), None, "{bad} words");
        }
        assert_eq!(BitWidth::from_f64(4.5), None);
        assert_eq!(BitWidth::from_f64(9.0), None);
        assert_eq!(BitWidth::from_f64(0.5), None);
    }

    #[test]
    fn stream_end_is_prefix_sum_of_code_bits() {
        for w in BitWidth::ALL {
            let mut sum = 0;
            for i in 0..TILE_WEIGHTS {
                sum += w.code_bits(i);
                assert_eq!(w.stream_end(i), sum, "{w} at {i}");
            }
            assert_eq!(sum, w.ring_bits(), "{w}");
        }
        // Worked example of the format reference (§6.4): S(i) = 2, 5, 7, 10, 12, 15 for K = 2.5.
        let k = BitWidth::from_f64(2.5).unwrap();
        let s: Vec<u32> = (0..6).map(|i| k.stream_end(i)).collect();
        assert_eq!(s, [2, 5, 7, 10, 12, 15]);
    }
}
