//! Plain descriptions that models hand to the backend: shapes and rules of attention, RoPE,
//! routing and the KV cache, and the per-token layout of a batch.

/// Rotary position embedding: `angle_i = position · inv_freq[i]` (f32, as transformers
/// computes it), cos/sin scaled by `attention_scaling` (YaRN), applied to `2·inv_freq.len()`
/// dims either as adjacent pairs (GPT-J, "interleaved") or as two halves (NeoX).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    pub inv_freq: Vec<f32>,
    pub attention_scaling: f32,
    pub interleaved: bool,
}

impl RopeSpec {
    /// Rotated dims per head.
    pub fn dim(&self) -> usize {
        2 * self.inv_freq.len()
    }
}

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoringFunction {
    Sigmoid,
    Softmax,
}

/// How a group of experts is ranked in group-limited routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupRanking {
    /// The group's best selection score (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// The sum of its two best selection scores (DeepSeek-V3 / GLM `noaux_tc`).
    TopTwoSum,
}

/// The routing rule of an MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterSpec {
    pub num_experts: usize,
    pub top_k: usize,
    pub scoring: ScoringFunction,
    /// Group-limited routing: experts in `n_group` equal groups; only the `topk_group` best
    /// groups (ranked by `group_ranking`) may be chosen. `n_group` 1 disables it.
    pub n_group: usize,
    pub topk_group: usize,
    pub group_ranking: GroupRanking,
    /// Renormalise the chosen weights to sum to one.
    pub normalize: bool,
    /// Multiply the final weights by this factor.
    pub scaling: f32,
}

/// Multi-head latent attention shapes (DeepSeek-V2/V3, GLM-4.7-Flash).
#[derive(Clone, Debug, PartialEq)]
pub struct MlaSpec {
    pub heads: usize,
    pub qk_nope_dim: usize,
    pub qk_rope_dim: usize,
    pub v_head_dim: usize,
    pub kv_lora_rank: usize,
    pub softmax_scale: f32,
    /// eps of `kv_a_layernorm`.
    pub latent_norm_eps: f32,
}

impl MlaSpec {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_dim + self.qk_rope_dim
    }

    /// Values cached per token per layer: latent plus the shared rope key.
    pub fn cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_dim
    }
}

/// Standard (GQA) attention shapes and rules.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionSpec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub softmax_scale: f32,
    /// Attend only to the last `window` positions (including the current one).
    pub sliding_window: Option<usize>,
    /// `tanh(score / cap) · cap` before the softmax (Gemma 2).
    pub logit_softcap: Option<f32>,
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
}

impl KvDtype {
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// Shape of the paged KV cache: `num_blocks` blocks of `block_size` token slots, each slot
/// holding `values_per_token` values per layer (MLA: one latent row; GQA: keys then values).
#[derive(Clone, Debug, PartialEq)]
pub struct KvCacheLayout {
    pub layers: usize,
    pub values_per_token: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub dtype: KvDtype,
}

impl KvCacheLayout {
    pub fn token_slots(&self) -> usize {
        self.block_size * self.num_blocks
    }

    pub fn bytes(&self) -> usize {
        self.layers * self.values_per_token * self.token_slots() * self.dtype.size()
    }
}

/// Where each token of a step sits: its position in its sequence, which sequence it belongs
/// to, and each sequence's cache blocks. Token `i` is written to the slot of its position and
/// attends to positions `0..=positions[i]` of its sequence (so a prefill chunk is causal).
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub positions: &'a [u32],
    pub sequence: &'a [u32],
    /// `[num_sequences, blocks_per_sequence]` row-major: block ids of each sequence.
    pub block_tables: &'a [u32],
    pub blocks_per_sequence: usize,
    pub block_size: usize,
}

impl Batch<'_> {
    pub fn rows(&self) -> usize {
        self.positions.len()
    }

    /// One past the largest position of the batch (0 when empty): the context a single
    /// sequence's rows see.
    pub fn context_len(&self) -> usize {
        self.positions.iter().max().map_or(0, |&p| p as usize + 1)
    }

    /// Cache slot holding position `pos` of sequence `seq`.
    #[inline]
    pub fn slot(&self, seq: u32, pos: u32) -> usize {
        let (pos, seq) = (pos as usize, seq as usize);
        let block = self.block_tables[seq * self.blocks_per_sequence + pos / self.block_size];
        block as usize * self.block_size + pos % self.block_size
    }
}
