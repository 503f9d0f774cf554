//! The three computed codebooks that map a 16-bit trellis state to an fp16 weight.
//!
//! Each codebook is a few integer operations followed by exactly one fp16 rounding. The
//! rounding is what makes a decoder bit-exact, so every value here is computed exactly in
//! f64 and rounded once to fp16 (the reference kernels do an fp16 add or one fused
//! multiply-add, both single-rounding operations).

use half::f16;
use std::sync::OnceLock;

/// Which codebook a quantized linear uses. Selected by a marker tensor next to the
/// trellis (`.mcg`, `.mul1`; none means 3INST).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codebook {
    /// QTIP's 3INST: affine LCG step, mask/xor into two fp16 halves, fp16 sum.
    Inst3,
    /// 3INST with multiplier 0xCBAC1FED and no additive constant.
    Mcg,
    /// Byte sum of one multiply, mapped affinely by one fp16 FMA.
    Mul1,
}

/// Multiplier of the `mcg` codebook; also the value stored in the `.mcg` marker tensor.
pub const MCG_MULTIPLIER: u32 = 0xCBAC_1FED;
/// Multiplier of the `mul1` codebook; also the value stored in the `.mul1` marker tensor.
pub const MUL1_MULTIPLIER: u32 = 0x83DC_D12D;

const INST3_MULTIPLIER: u32 = 89_226_354;
const INST3_ADDEND: u32 = 64_248_484;
const INST_MASK: u32 = 0x8FFF_8FFF;
const INST_XOR: u32 = 0x3B60_3B60;
/// fp16 0x1EEE and 0xC931: the scale and offset of mul1's single FMA.
const MUL1_SCALE_BITS: u16 = 0x1EEE;
const MUL1_OFFSET_BITS: u16 = 0xC931;

/// RMS of the 3INST codebook over all states; the quantizer scales every codebook's target
/// by this value (the per-tensor global scale absorbs the other codebooks' different RMS).
pub const CODEBOOK_SCALE: f32 = 1.243_710_9;

impl Codebook {
    pub const ALL: [Codebook; 3] = [Codebook::Inst3, Codebook::Mcg, Codebook::Mul1];

    /// Name as used in `quantization_config.codebook` and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Codebook::Inst3 => "3inst",
            Codebook::Mcg => "mcg",
            Codebook::Mul1 => "mul1",
        }
    }

    pub fn from_name(name: &str) -> Option<Codebook> {
        match name.to_ascii_lowercase().as_str() {
            "3inst" => Some(Codebook::Inst3),
            "mcg" => Some(Codebook::Mcg),
            "mul1" => Some(Codebook::Mul1),
            _ => None,
        }
    }

    /// Decode one state to its fp16 value, exactly as the reference kernels do.
    #[inline]
    pub fn decode(self, state: u16) -> f16 {
        let s = u32::from(state);
        match self {
            Codebook::Inst3 => {
                inst_halves_sum(s.wrapping_mul(INST3_MULTIPLIER).wrapping_add(INST3_ADDEND))
            }
            Codebook::Mcg => inst_halves_sum(s.wrapping_mul(MCG_MULTIPLIER)),
            Codebook::Mul1 => {
                let x = s.wrapping_mul(MUL1_MULTIPLIER);
                let byte_sum = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24);
                // 0x6400 is fp16 1024.0 whose ulp is 1, so adding the byte sum to the bit
                // pattern yields exactly 1024 + byte_sum.
                let h = f64::from(1024 + byte_sum);
                let scale = f16::from_bits(MUL1_SCALE_BITS).to_f64();
                let offset = f16::from_bits(MUL1_OFFSET_BITS).to_f64();
                // h·scale has at most 22 significant bits and the sum stays within f64's
                // 53, so this is exact; the one rounding happens in from_f64.
                f16::from_f64(h * scale + offset)
            }
        }
    }

    /// All 65536 values of this codebook, indexed by state (computed once per process).
    pub fn table(self) -> &'static [f16] {
        static TABLES: [OnceLock<Box<[f16]>>; 3] =
            [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let slot = match self {
            Codebook::Inst3 => &TABLES[0],
            Codebook::Mcg => &TABLES[1],
            Codebook::Mul1 => &TABLES[2],
        };
        slot.get_or_init(|| (0..=u16::MAX).map(|s| self.decode(s)).collect())
    }

    /// The same table widened to f32 (exact), for arithmetic that works in f32.
    pub fn table_f32(self) -> &'static [f32] {
        static TABLES: [OnceLock<Box<[f32]>>; 3] =
            [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let slot = match self {
            Codebook::Inst3 => &TABLES[0],
            Codebook::Mcg => &TABLES[1],
            Codebook::Mul1 => &TABLES[2],
        };
        slot.get_or_init(|| self.table().iter().map(|v| v.to_f32()).collect())
    }
}

/// Mask and xor a 32-bit word into two finite fp16 halves and add them with one rounding.
#[inline]
fn inst_halves_sum(x: u32) -> f16 {
    let x = (x & INST_MASK) ^ INST_XOR;
    let lo = f16::from_bits(x as u16).to_f64();
    let hi = f16::from_bits((x >> 16) as u16).to_f64();
    f16::from_f64(lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test vectors from the format reference (§7.5).
    #[test]
    fn reference_test_vectors() {
        let cases: [(u16, f64, f64, f64); 5] = [
            (0x0000, 0.76806640625, 1.84375, -3.453125),
            (0x0001, -0.91943359375, 0.134521484375, 0.64111328125),
            (0x0002, 0.931640625, -0.75927734375, -0.448486328125),
            (0x1234, -2.19921875, 1.5146484375, -0.5771484375),
            (0xFFFF, -0.158203125, 0.85009765625, -0.6513671875),
        ];
        for (s, inst3, mcg, mul1) in cases {
            assert_eq!(Codebook::Inst3.decode(s).to_f64(), inst3, "3inst {s:#x}");
            assert_eq!(Codebook::Mcg.decode(s).to_f64(), mcg, "mcg {s:#x}");
            assert_eq!(Codebook::Mul1.decode(s).to_f64(), mul1, "mul1 {s:#x}");
        }
    }

    /// Statistics over all states (§7.4): RMS, extremes and number of distinct values.
    #[test]
    fn statistics_over_all_states() {
        let expect = [
            (Codebook::Inst3, 1.243711, -3.95703125, 3.97265625, 10598),
            (Codebook::Mcg, 1.244112, -3.94921875, 3.94921875, 10746),
            (Codebook::Mul1, 1.000312, -3.453125, 3.34765625, 913),
        ];
        for (cb, rms, min, max, distinct) in expect {
            let t = cb.table();
            let sq: f64 = t.iter().map(|v| v.to_f64() * v.to_f64()).sum();
            let got_rms = (sq / 65536.0).sqrt();
            assert!((got_rms - rms).abs() < 1e-6, "{cb:?} rms {got_rms}");
            let lo = t.iter().map(|v| v.to_f64()).fold(f64::INFINITY, f64::min);
            let hi = t
                .iter()
                .map(|v| v.to_f64())
                .fold(f64::NEG_INFINITY, f64::max);
            assert_eq!((lo, hi), (min, max), "{cb:?} extremes");
            let mut bits: Vec<u16> = t.iter().map(|v| v.to_bits()).collect();
            bits.sort_unstable();
            bits.dedup();
            assert_eq!(bits.len(), distinct, "{cb:?} distinct values");
        }
    }

    #[test]
    fn names_round_trip() {
        for cb in Codebook::ALL {
            assert_eq!(Codebook::from_name(cb.name()), Some(cb));
        }
        assert_eq!(Codebook::from_name("hyb"), None);
    }
}
