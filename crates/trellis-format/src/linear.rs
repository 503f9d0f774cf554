//! Recognising how a linear layer is stored — EXL3 trellis group or dense weight — and
//! building the matching typed weights with every dtype and shape checked.

use crate::dtype::{DType, describe_shape};
use crate::error::{FormatError, Result};
use crate::store::{TensorStore, TensorView};
use half::f16;
use std::borrow::Cow;
use trellis_codec::{BitWidth, Codebook, TrellisLinear};

/// Multiple that EXL3 pads both dimensions of a quantized linear to.
pub const EXL3_PAD: usize = 128;
/// Rows and columns of one trellis tile.
const TILE: usize = 16;

/// The weights of one linear layer, however they are stored.
#[derive(Clone, Debug)]
pub enum LinearWeights<'a> {
    /// EXL3: `{prefix}.trellis` / `.suh` / `.svh` (or legacy `.su` / `.sv`), optional `.bias`,
    /// codebook chosen by the `.mul1` / `.mcg` marker. Orientation (in, out), padded to 128.
    Trellis(TrellisLinear<'a>),
    /// Dense `{prefix}.weight` in Hugging Face orientation `[out, in]` (F32/F16/BF16), with an
    /// optional `{prefix}.bias` `[out]`.
    Dense {
        weight: TensorView<'a>,
        bias: Option<TensorView<'a>>,
    },
}

impl LinearWeights<'_> {
    pub fn is_quantized(&self) -> bool {
        matches!(self, LinearWeights::Trellis(_))
    }

    /// Logical input features.
    pub fn in_features(&self) -> usize {
        match self {
            LinearWeights::Trellis(t) => t.in_features,
            LinearWeights::Dense { weight, .. } => weight.shape[1],
        }
    }

    /// Logical output features.
    pub fn out_features(&self) -> usize {
        match self {
            LinearWeights::Trellis(t) => t.out_features,
            LinearWeights::Dense { weight, .. } => weight.shape[0],
        }
    }

    /// Bytes a full pass over the layer reads from storage.
    pub fn storage_bytes(&self) -> usize {
        match self {
            LinearWeights::Trellis(t) => t.storage_bytes(),
            LinearWeights::Dense { weight, bias } => {
                weight.bytes.len() + bias.map_or(0, |b| b.bytes.len())
            }
        }
    }
}

/// `x` rounded up to a multiple of 128.
pub fn pad_to_exl3(x: usize) -> usize {
    x.div_ceil(EXL3_PAD).saturating_mul(EXL3_PAD)
}

/// The trellis tensor's view of a quantized linear: bit width and padded sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrellisShape {
    pub bits: BitWidth,
    /// Padded input features (k = trellis dim 0 · 16).
    pub k_padded: usize,
    /// Padded output features (n = trellis dim 1 · 16).
    pub n_padded: usize,
}

impl TensorStore {
    /// The weights of the linear `prefix` with the given logical sizes (EXL3 rules in
    /// `exl3-format.md` §3): a `{prefix}.trellis` group if present, else `{prefix}.weight`.
    ///
    /// For EXL3 the padded sizes must be exactly the logical sizes rounded up to a multiple
    /// of 128 (what ExLlamaV3 writes); anything else means the config and the tensors
    /// disagree. Should a directory hold both `.trellis` and `.weight` for one prefix, the
    /// EXL3 group is used.
    pub fn linear(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
    ) -> Result<LinearWeights<'_>> {
        if self.contains(&format!("{prefix}.trellis")) {
            return self
                .trellis_linear(prefix, Some((in_features, out_features)))
                .map(LinearWeights::Trellis);
        }
        let weight_name = format!("{prefix}.weight");
        let Some(weight) = self.try_get(&weight_name) else {
            return Err(FormatError::MissingLinear {
                prefix: prefix.to_string(),
                dir: self.dir().to_path_buf(),
            });
        };
        const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
        weight.check(&FLOATS, &[out_features, in_features])?;
        let bias = self.expect_optional(&format!("{prefix}.bias"), &FLOATS, &[out_features])?;
        Ok(LinearWeights::Dense { weight, bias })
    }

    /// An EXL3 linear whose logical sizes are taken to be its padded sizes. For tools (such
    /// as `inspect`) that do not know the model's dimensions; a model should call
    /// [`TensorStore::linear`] with its real sizes.
    pub fn trellis_linear_padded(&self, prefix: &str) -> Result<TrellisLinear<'_>> {
        self.trellis_linear(prefix, None)
    }

    /// Bit width and padded sizes from `{prefix}.trellis`, checking its dtype and shape.
    pub fn trellis_shape(&self, prefix: &str) -> Result<TrellisShape> {
        let trellis = self.get(&format!("{prefix}.trellis"))?;
        trellis_shape_of(&trellis)
    }

    /// The codebook of an EXL3 linear, from its marker tensors.
    pub fn trellis_codebook(&self, prefix: &str) -> Result<Codebook> {
        let mul1 = self.contains(&format!("{prefix}.mul1"));
        let mcg = self.contains(&format!("{prefix}.mcg"));
        match (mul1, mcg) {
            (true, true) => Err(FormatError::ConflictingCodebooks {
                file: self.file_of(&format!("{prefix}.trellis")),
                prefix: prefix.to_string(),
            }),
            (true, false) => Ok(Codebook::Mul1),
            (false, true) => Ok(Codebook::Mcg),
            (false, false) => Ok(Codebook::Inst3),
        }
    }

    /// An EXL3 linear with the given logical sizes, or its padded sizes when `None`.
    pub(crate) fn trellis_linear(
        &self,
        prefix: &str,
        logical: Option<(usize, usize)>,
    ) -> Result<TrellisLinear<'_>> {
        let trellis = self.get(&format!("{prefix}.trellis"))?;
        let file = trellis.file.to_path_buf();
        let shape = trellis_shape_of(&trellis)?;
        let (k, n) = (shape.k_padded, shape.n_padded);
        let (in_features, out_features) = logical.unwrap_or((k, n));
        if logical.is_some() {
            for (what, logical, padded) in [
                ("in_features", in_features, k),
                ("out_features", out_features, n),
            ] {
                if padded != pad_to_exl3(logical) || logical == 0 {
                    return Err(trellis.mismatch(format!(
                        "shape [{}, {}, 16·K] for in_features {in_features} × out_features \
                         {out_features} padded to multiples of 128 ({what} {logical} pads to \
                         {}, the tensor stores {padded})",
                        pad_to_exl3(in_features) / TILE,
                        pad_to_exl3(out_features) / TILE,
                        pad_to_exl3(logical),
                    )));
                }
            }
        }
        if self.contains(&format!("{prefix}.scale")) {
            return Err(FormatError::ScaleTensor {
                file,
                prefix: prefix.to_string(),
            });
        }
        let codebook = self.trellis_codebook(prefix)?;
        let suh = self.sign_scale(prefix, "suh", "su", k)?;
        let svh = self.sign_scale(prefix, "svh", "sv", n)?;
        let bias = match self.expect_optional(&format!("{prefix}.bias"), &[DType::F16], &[n])? {
            Some(b) => Some(b.as_f16()?),
            None => None,
        };
        let words = trellis.as_u16_words()?;
        TrellisLinear::new(
            words,
            suh,
            svh,
            bias,
            shape.bits,
            codebook,
            in_features,
            out_features,
        )
        .map_err(|source| FormatError::LinearShape {
            file,
            prefix: prefix.to_string(),
            source,
        })
    }

    /// `{prefix}.{scaled}` f16 `[len]`, or legacy packed sign bits `{prefix}.{legacy}` int16
    /// `[len/16]` expanded to ±1.
    fn sign_scale(
        &self,
        prefix: &str,
        scaled: &str,
        legacy: &str,
        len: usize,
    ) -> Result<Cow<'_, [f16]>> {
        let scaled_name = format!("{prefix}.{scaled}");
        if let Some(view) = self.try_get(&scaled_name) {
            view.check(&[DType::F16], &[len])?;
            return view.as_f16();
        }
        let legacy_name = format!("{prefix}.{legacy}");
        if let Some(view) = self.try_get(&legacy_name) {
            view.check(&[DType::I16, DType::U16], &[len / TILE])?;
            return Ok(Cow::Owned(expand_sign_bits(&view.as_u16_words()?)));
        }
        Err(FormatError::MissingScale {
            tensor: scaled_name,
            legacy: legacy_name,
            dir: self.dir().to_path_buf(),
        })
    }

    /// The file holding `name`, or the store's directory when it is absent.
    fn file_of(&self, name: &str) -> std::path::PathBuf {
        self.try_get(name)
            .map_or_else(|| self.dir().to_path_buf(), |v| v.file.to_path_buf())
    }
}

/// Legacy sign words: bit i of word j is the sign of element 16j + i; set means −1.
pub fn expand_sign_bits(words: &[u16]) -> Vec<f16> {
    words
        .iter()
        .flat_map(|&w| {
            (0..16).map(move |bit| {
                if w >> bit & 1 == 1 {
                    f16::NEG_ONE
                } else {
                    f16::ONE
                }
            })
        })
        .collect()
}

fn trellis_shape_of(trellis: &TensorView<'_>) -> Result<TrellisShape> {
    let &[tiles_k, tiles_n, words] = trellis.shape else {
        return Err(trellis.mismatch("a 3-dim int16 tensor [k/16, n/16, 16·K]"));
    };
    trellis.check_dtype(&[DType::I16, DType::U16])?;
    let bits = BitWidth::from_tile_words(words).ok_or_else(|| FormatError::BitWidthOutOfRange {
        file: trellis.file.to_path_buf(),
        tensor: trellis.name.to_string(),
        last_dim: words,
    })?;
    // A tensor with a zero dimension holds no data, so its other dimensions are unchecked by
    // the header validation and may be absurd: multiply with care.
    let k_padded = tiles_k.checked_mul(TILE).unwrap_or(0);
    let n_padded = tiles_n.checked_mul(TILE).unwrap_or(0);
    for padded in [k_padded, n_padded] {
        if padded == 0 || !padded.is_multiple_of(EXL3_PAD) {
            return Err(trellis.mismatch(format!(
                "padded sizes k = dim0·16 and n = dim1·16 that are positive multiples of 128 \
                 (here k = {k_padded}, n = {n_padded}, from shape {})",
                describe_shape(trellis.shape)
            )));
        }
    }
    Ok(TrellisShape {
        bits,
        k_padded,
        n_padded,
    })
}
