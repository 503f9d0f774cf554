//! ggml tensor types: ids as stored in GGUF tensor infos, and the block geometry every
//! size computation needs (elements per block, bytes per block).

use std::fmt;

/// A ggml tensor element type. Types whose block geometry is known can be opened (their
/// byte ranges validated); [`GgmlType::can_dequantize`] says which trellis also decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // ggml's own spellings, as users see them in file listings
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    pub const ALL: [GgmlType; 31] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
    ];

    /// (id in the file, name, elements per block, bytes per block).
    fn facts(self) -> (u32, &'static str, usize, usize) {
        match self {
            GgmlType::F32 => (0, "F32", 1, 4),
            GgmlType::F16 => (1, "F16", 1, 2),
            GgmlType::Q4_0 => (2, "Q4_0", 32, 18),
            GgmlType::Q4_1 => (3, "Q4_1", 32, 20),
            GgmlType::Q5_0 => (6, "Q5_0", 32, 22),
            GgmlType::Q5_1 => (7, "Q5_1", 32, 24),
            GgmlType::Q8_0 => (8, "Q8_0", 32, 34),
            GgmlType::Q2_K => (10, "Q2_K", 256, 84),
            GgmlType::Q3_K => (11, "Q3_K", 256, 110),
            GgmlType::Q4_K => (12, "Q4_K", 256, 144),
            GgmlType::Q5_K => (13, "Q5_K", 256, 176),
            GgmlType::Q6_K => (14, "Q6_K", 256, 210),
            GgmlType::Q8_K => (15, "Q8_K", 256, 292),
            GgmlType::IQ2_XXS => (16, "IQ2_XXS", 256, 66),
            GgmlType::IQ2_XS => (17, "IQ2_XS", 256, 74),
            GgmlType::IQ3_XXS => (18, "IQ3_XXS", 256, 98),
            GgmlType::IQ1_S => (19, "IQ1_S", 256, 50),
            GgmlType::IQ4_NL => (20, "IQ4_NL", 32, 18),
            GgmlType::IQ3_S => (21, "IQ3_S", 256, 110),
            GgmlType::IQ2_S => (22, "IQ2_S", 256, 82),
            GgmlType::IQ4_XS => (23, "IQ4_XS", 256, 136),
            GgmlType::I8 => (24, "I8", 1, 1),
            GgmlType::I16 => (25, "I16", 1, 2),
            GgmlType::I32 => (26, "I32", 1, 4),
            GgmlType::I64 => (27, "I64", 1, 8),
            GgmlType::F64 => (28, "F64", 1, 8),
            GgmlType::IQ1_M => (29, "IQ1_M", 256, 56),
            GgmlType::BF16 => (30, "BF16", 1, 2),
            GgmlType::TQ1_0 => (34, "TQ1_0", 256, 54),
            GgmlType::TQ2_0 => (35, "TQ2_0", 256, 66),
            GgmlType::MXFP4 => (39, "MXFP4", 32, 17),
        }
    }

    /// The type with this id; `None` for ids this crate has no block geometry for.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    pub fn from_name(name: &str) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn id(self) -> u32 {
        self.facts().0
    }

    /// ggml's name: "Q4_K", "BF16", …
    pub fn name(self) -> &'static str {
        self.facts().1
    }

    /// Elements per block (1 for plain element types).
    pub fn block_len(self) -> usize {
        self.facts().2
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.facts().3
    }

    /// Bytes of `elements` values, `None` when `elements` is not a whole number of blocks or
    /// the size overflows.
    pub fn byte_len(self, elements: u64) -> Option<u64> {
        let block_len = self.block_len() as u64;
        if !elements.is_multiple_of(block_len) {
            return None;
        }
        (elements / block_len).checked_mul(self.block_bytes() as u64)
    }

    /// Whether [`crate::gguf::dequantize`] decodes this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q2_K
                | GgmlType::Q3_K
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::Q6_K
        )
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_are_unique_and_round_trip() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
        }
        assert_eq!(GgmlType::from_id(4), None, "Q4_2 was removed from ggml");
        assert_eq!(GgmlType::Q4_K.byte_len(512), Some(288));
        assert_eq!(GgmlType::Q4_K.byte_len(100), None);
        assert_eq!(GgmlType::Q8_0.byte_len(u64::MAX - 31), None);
    }
}
