//! `--dequantize`: which EXL3 linears are decoded once, at upload, into dense f16 weights.
//!
//! The trellis path keeps the packed words on the device and decodes them inside every
//! product (memory ≈ file size). A dequantized linear costs 16 bits per weight instead of
//! 2–8, but its product is a plain f16 GEMV with no Hadamards and no decode: the choice trades
//! memory for speed where the product is instruction- or latency-bound (BENCHMARKS.md says
//! where each wins). The weights are the decoded `W̃` with both Hadamards and scales applied,
//! rounded once to f16.

/// Groups of linears, chosen by the names the models upload them under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DequantizeSet {
    /// `self_attn.*` projections (q/q_a/q_b, kv_a, o; k/v in GQA models). MLA's `kv_b` keeps
    /// its own layout for the absorbed attention and is not covered.
    pub attention: bool,
    /// Routed experts (`mlp.experts.*`).
    pub experts: bool,
    /// Dense MLPs and shared experts (`mlp.*` outside the routed experts).
    pub mlp: bool,
    /// The output head (`lm_head`).
    pub head: bool,
}

/// The group words `--dequantize` accepts besides `all` and `none`.
const GROUPS: [&str; 4] = ["attn", "experts", "mlp", "head"];

impl DequantizeSet {
    pub const NONE: DequantizeSet = DequantizeSet {
        attention: false,
        experts: false,
        mlp: false,
        head: false,
    };
    pub const ALL: DequantizeSet = DequantizeSet {
        attention: true,
        experts: true,
        mlp: true,
        head: true,
    };

    /// Parse `all`, `none`, or a comma-separated list of `attn`, `experts`, `mlp`, `head`.
    pub fn parse(spec: &str) -> Result<DequantizeSet, String> {
        let mut set = DequantizeSet::NONE;
        for word in spec.split(',').map(str::trim) {
            match word {
                "all" => set = DequantizeSet::ALL,
                "none" => {}
                "attn" | "attention" => set.attention = true,
                "experts" => set.experts = true,
                "mlp" => set.mlp = true,
                "head" => set.head = true,
                other => {
                    return Err(format!(
                        "unknown --dequantize group {other:?} (expected all, none, or a comma-separated list of {})",
                        GROUPS.join(", ")
                    ));
                }
            }
        }
        Ok(set)
    }

    pub fn is_empty(&self) -> bool {
        *self == DequantizeSet::NONE
    }

    /// Whether the linear uploaded as `name` belongs to a chosen group.
    pub fn covers(&self, name: &str) -> bool {
        let routed = name.contains(".experts.");
        (self.attention && name.contains(".self_attn."))
            || (self.experts && routed)
            || (self.mlp && !routed && name.contains(".mlp."))
            || (self.head && name == "lm_head")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_parse_and_cover_the_names_models_upload() {
        let set = DequantizeSet::parse("attn, experts").unwrap();
        assert!(set.covers("model.layers.3.self_attn.q_b_proj"));
        assert!(set.covers("model.layers.3.mlp.experts.17.down_proj"));
        assert!(!set.covers("model.layers.3.mlp.shared_experts.up_proj"));
        assert!(!set.covers("lm_head"));

        let mlp = DequantizeSet::parse("mlp").unwrap();
        assert!(mlp.covers("model.layers.0.mlp.gate_proj"));
        assert!(mlp.covers("model.layers.3.mlp.shared_experts.down_proj"));
        assert!(!mlp.covers("model.layers.3.mlp.experts.0.down_proj"));

        assert_eq!(DequantizeSet::parse("all").unwrap(), DequantizeSet::ALL);
        assert!(DequantizeSet::parse("none").unwrap().is_empty());
        assert!(DequantizeSet::ALL.covers("lm_head"));
        let err = DequantizeSet::parse("attn,lm").unwrap_err();
        assert!(err.contains("\"lm\""), "{err}");
    }
}
