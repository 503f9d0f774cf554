//! Element types of stored tensors, as named in safetensors headers.

use serde::Serialize;
use std::fmt;

/// Element type of a stored tensor. Sub-byte types (safetensors' F4, F6_*) are not
/// represented: no model trellis loads uses them, and rejecting them at open keeps every
/// size computation in whole bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum DType {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    F8E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl DType {
    /// Bytes per element.
    pub fn size_of(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::F8E4M3 | DType::F8E5M2 | DType::F8E8M0 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// Name as written in safetensors headers (`"F16"`, `"BF16"`, `"I16"`, …).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E8M0 => "F8_E8M0",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// True for the float types trellis reads as dense weights (F32, F16, BF16).
    pub fn is_dense_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Convert from the safetensors crate's dtype; `None` for types trellis does not handle.
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
        use safetensors::Dtype as S;
        Some(match dtype {
            S::BOOL => DType::Bool,
            S::U8 => DType::U8,
            S::I8 => DType::I8,
            S::F8_E4M3 => DType::F8E4M3,
            S::F8_E5M2 => DType::F8E5M2,
            S::F8_E8M0 => DType::F8E8M0,
            S::I16 => DType::I16,
            S::U16 => DType::U16,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::I32 => DType::I32,
            S::U32 => DType::U32,
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            S::I64 => DType::I64,
            S::U64 => DType::U64,
            _ => return None,
        })
    }

    /// The safetensors crate's dtype (used when writing files).
    pub fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::Bool => S::BOOL,
            DType::U8 => S::U8,
            DType::I8 => S::I8,
            DType::F8E4M3 => S::F8_E4M3,
            DType::F8E5M2 => S::F8_E5M2,
            DType::F8E8M0 => S::F8_E8M0,
            DType::I16 => S::I16,
            DType::U16 => S::U16,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::I32 => S::I32,
            DType::U32 => S::U32,
            DType::F32 => S::F32,
            DType::F64 => S::F64,
            DType::I64 => S::I64,
            DType::U64 => S::U64,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// "F16", "F16 or BF16", "F32, F16 or BF16" — for error messages.
pub(crate) fn describe_dtypes(dtypes: &[DType]) -> String {
    match dtypes {
        [] => "any dtype".to_string(),
        [one] => one.name().to_string(),
        [rest @ .., last] => {
            let head: Vec<&str> = rest.iter().map(|d| d.name()).collect();
            format!("{} or {}", head.join(", "), last.name())
        }
    }
}

/// "[2048, 512]" — for error messages.
pub(crate) fn describe_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions() {
        assert_eq!(describe_dtypes(&[DType::F16]), "F16");
        assert_eq!(describe_dtypes(&[DType::I16, DType::U16]), "I16 or U16");
        assert_eq!(
            describe_dtypes(&[DType::F32, DType::F16, DType::BF16]),
            "F32, F16 or BF16"
        );
        assert_eq!(describe_shape(&[]), "[]");
        assert_eq!(describe_shape(&[32, 40, 48]), "[32, 40, 48]");
    }

    #[test]
    fn safetensors_round_trip() {
        for d in [
            DType::Bool,
            DType::U8,
            DType::I8,
            DType::F8E4M3,
            DType::F8E5M2,
            DType::F8E8M0,
            DType::I16,
            DType::U16,
            DType::F16,
            DType::BF16,
            DType::I32,
            DType::U32,
            DType::F32,
            DType::F64,
            DType::I64,
            DType::U64,
        ] {
            let st = d.to_safetensors();
            assert_eq!(DType::from_safetensors(st), Some(d));
            assert_eq!(st.bitsize(), 8 * d.size_of());
            assert_eq!(st.to_string(), d.name());
        }
        assert_eq!(DType::from_safetensors(safetensors::Dtype::F4), None);
    }
}
