//! Tiny GGUF models built in memory, the way llama.cpp's converter would write them from a
//! Hugging Face checkpoint: its names, its reversed dims (done by the writer), its Q/K row
//! permutation for Llama and its `+1` on Gemma norms — written here from the converter's
//! documented rules, independently of the import code they test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use trellis_format::gguf::{GgmlType, GgufArray, GgufWriter};

/// Deterministic pseudo-random f32s in [-1, 1) (xorshift; no dependency, stable across
/// platforms).
pub fn random_values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Hugging Face tensors by name: (PyTorch shape, values).
pub type HfTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }
}

pub const HIDDEN: usize = 32;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 8;
pub const FFN: usize = 48;
pub const LAYERS: usize = 2;

/// SentencePiece token types.
pub const NORMAL: i32 = 1;
pub const UNKNOWN: i32 = 2;
pub const CONTROL: i32 = 3;
pub const USER_DEFINED: i32 = 4;
pub const BYTE: i32 = 6;

/// A tiny SentencePiece vocabulary: specials, 256 byte tokens, normal pieces ranked by
/// score, a user-defined whitespace piece stored with real spaces (as llama.cpp writes
/// Gemma's) and `<end_of_turn>`.
pub struct SpmVocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
}

pub const SPM_PIECES: [&str; 10] = ["▁", "a", "b", "c", "ab", "▁a", "bc", "abc", "▁ab", "é"];

pub fn spm_vocab() -> SpmVocab {
    let mut v = SpmVocab {
        tokens: Vec::new(),
        scores: Vec::new(),
        types: Vec::new(),
    };
    let mut push = |t: &str, s: f32, ty: i32| {
        v.tokens.push(t.to_string());
        v.scores.push(s);
        v.types.push(ty);
    };
    push("<pad>", -1000.0, CONTROL);
    push("<eos>", -1000.0, CONTROL);
    push("<bos>", -1000.0, CONTROL);
    push("<unk>", -1000.0, UNKNOWN);
    push("  ", -1000.0, USER_DEFINED);
    push("<end_of_turn>", -1000.0, CONTROL);
    for b in 0..=255u8 {
        push(&format!("<0x{b:02X}>"), 0.0, BYTE);
    }
    for (rank, piece) in SPM_PIECES.iter().enumerate() {
        push(piece, -(rank as f32), NORMAL);
    }
    v
}

pub fn spm_id(vocab: &SpmVocab, token: &str) -> u32 {
    vocab.tokens.iter().position(|t| t == token).unwrap() as u32
}

/// GPT-2's byte → printable character table.
pub fn byte_level_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = vec!['\0'; 256];
    for &b in &printable {
        chars[b as usize] = char::from_u32(b).unwrap();
    }
    let mut next = 256;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            chars[b as usize] = char::from_u32(next).unwrap();
            printable.push(b);
            next += 1;
        }
    }
    chars
}

/// A tiny byte-level BPE vocabulary: the 256 byte characters, `ab`, `Ġab`, and two specials.
pub struct Gpt2Vocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub merges: Vec<String>,
}

pub fn gpt2_vocab() -> Gpt2Vocab {
    let mut tokens: Vec<String> = byte_level_chars().iter().map(|c| c.to_string()).collect();
    let mut types = vec![NORMAL; 256];
    for (t, ty) in [
        ("ab", NORMAL),
        ("Ġab", NORMAL),
        ("<|endoftext|>", CONTROL),
        ("<|im_end|>", CONTROL),
        ("<think>", USER_DEFINED),
    ] {
        tokens.push(t.to_string());
        types.push(ty);
    }
    Gpt2Vocab {
        tokens,
        types,
        merges: vec!["a b".into(), "Ġ ab".into()],
    }
}

/// Hugging Face tensors of a tiny model of `arch` (name → (shape, values)), in HF semantics.
pub fn hf_tensors(arch: Arch, vocab: usize, tie: bool) -> HfTensors {
    let mut out = BTreeMap::new();
    let mut seed = 1;
    let mut add = |name: String, shape: Vec<usize>| {
        let n = shape.iter().product();
        seed += 1;
        out.insert(name, (shape, random_values(seed, n)));
    };
    add("model.embed_tokens.weight".into(), vec![vocab, HIDDEN]);
    add("model.norm.weight".into(), vec![HIDDEN]);
    if !tie {
        add("lm_head.weight".into(), vec![vocab, HIDDEN]);
    }
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![HIDDEN]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]);
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![HEADS * HEAD_DIM, HIDDEN],
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![HIDDEN, HEADS * HEAD_DIM],
        );
        add(format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN]);
        add(format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN]);
        add(format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN]);
        if arch == Arch::Qwen2 {
            add(format!("{p}.self_attn.q_proj.bias"), vec![HEADS * HEAD_DIM]);
            add(
                format!("{p}.self_attn.k_proj.bias"),
                vec![KV_HEADS * HEAD_DIM],
            );
            add(
                format!("{p}.self_attn.v_proj.bias"),
                vec![KV_HEADS * HEAD_DIM],
            );
        }
        if arch == Arch::Qwen3 || arch == Arch::Gemma3 {
            add(format!("{p}.self_attn.q_norm.weight"), vec![HEAD_DIM]);
            add(format!("{p}.self_attn.k_norm.weight"), vec![HEAD_DIM]);
        }
        if arch == Arch::Gemma3 {
            add(
                format!("{p}.pre_feedforward_layernorm.weight"),
                vec![HIDDEN],
            );
            add(
                format!("{p}.post_feedforward_layernorm.weight"),
                vec![HIDDEN],
            );
        }
    }
    out
}

/// llama.cpp's name for a Hugging Face tensor.
pub fn gguf_name(arch: Arch, hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, suffix) = rest.rsplit_once('.').unwrap();
    let gguf = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if arch == Arch::Gemma3 => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{gguf}.{suffix}")
}

/// The converter's RoPE permutation of q/k rows (weights or biases): within each head, view
/// the rows as [2, d/2] and transpose to [d/2, 2].
pub fn permute_rows(values: &[f32], heads: usize, rows: usize) -> Vec<f32> {
    let cols = values.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let from = h * head_dim + j * half + i;
                let to = h * head_dim + i * 2 + j;
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Q8_0 blocks whose dequantization is exactly `scale · q`: returns (bytes, exact values).
pub fn q8_0_blocks(seed: u64, n: usize) -> (Vec<u8>, Vec<f32>) {
    assert_eq!(n % 32, 0);
    let raw = random_values(seed, n + n / 32);
    let mut bytes = Vec::new();
    let mut values = Vec::new();
    for (b, chunk) in raw.chunks_exact(33).enumerate() {
        let scale = half::f16::from_f32(0.01 + 0.001 * b as f32);
        bytes.extend_from_slice(&scale.to_le_bytes());
        for &r in &chunk[1..] {
            let q = (r * 127.0) as i8;
            bytes.push(q as u8);
            values.push(f32::from(q) * scale.to_f32());
        }
    }
    (bytes, values)
}

/// What the tiny-model builder should do.
pub struct TinyOptions {
    pub arch: Arch,
    pub tie: bool,
    /// Store `blk.0.attn_q.weight` as Q8_0 (its HF values then come from the blocks).
    pub quantized_q: bool,
    pub gpt2_tokenizer: bool,
    pub chat_template: Option<String>,
}

/// A tiny GGUF model of `opts.arch` and the HF tensors it must import to.
pub fn tiny_gguf(opts: &TinyOptions) -> (Vec<u8>, HfTensors) {
    let arch = opts.arch;
    let a = arch.name();
    let mut w = GgufWriter::new();
    w.set("general.architecture", a);
    w.set("general.name", "tiny test model");
    w.set(&format!("{a}.context_length"), 256u32);
    w.set(&format!("{a}.embedding_length"), HIDDEN as u32);
    w.set(&format!("{a}.block_count"), LAYERS as u32);
    w.set(&format!("{a}.feed_forward_length"), FFN as u32);
    w.set(&format!("{a}.attention.head_count"), HEADS as u32);
    w.set(&format!("{a}.attention.head_count_kv"), KV_HEADS as u32);
    w.set(&format!("{a}.attention.key_length"), HEAD_DIM as u32);
    w.set(&format!("{a}.attention.value_length"), HEAD_DIM as u32);
    w.set(&format!("{a}.attention.layer_norm_rms_epsilon"), 1e-5f32);
    w.set(&format!("{a}.rope.freq_base"), 50_000f32);
    if arch == Arch::Gemma3 {
        w.set(&format!("{a}.attention.sliding_window"), 16u32);
    }
    let vocab_len;
    if opts.gpt2_tokenizer {
        let v = gpt2_vocab();
        vocab_len = v.tokens.len();
        w.set("tokenizer.ggml.model", "gpt2");
        w.set("tokenizer.ggml.pre", "qwen2");
        w.set("tokenizer.ggml.tokens", GgufArray::String(v.tokens.clone()));
        w.set("tokenizer.ggml.token_type", GgufArray::I32(v.types.clone()));
        w.set("tokenizer.ggml.merges", GgufArray::String(v.merges.clone()));
        w.set("tokenizer.ggml.eos_token_id", 258u32);
        w.set("tokenizer.ggml.padding_token_id", 258u32);
        w.set("tokenizer.ggml.add_bos_token", false);
    } else {
        let v = spm_vocab();
        vocab_len = v.tokens.len();
        w.set("tokenizer.ggml.model", "llama");
        w.set("tokenizer.ggml.tokens", GgufArray::String(v.tokens.clone()));
        w.set("tokenizer.ggml.scores", GgufArray::F32(v.scores.clone()));
        w.set("tokenizer.ggml.token_type", GgufArray::I32(v.types.clone()));
        w.set("tokenizer.ggml.bos_token_id", 2u32);
        w.set("tokenizer.ggml.eos_token_id", 1u32);
        w.set("tokenizer.ggml.unknown_token_id", 3u32);
        w.set("tokenizer.ggml.padding_token_id", 0u32);
        w.set("tokenizer.ggml.add_bos_token", true);
        w.set("tokenizer.ggml.add_eos_token", false);
        w.set("tokenizer.ggml.add_space_prefix", arch != Arch::Gemma3);
    }
    if let Some(template) = &opts.chat_template {
        w.set("tokenizer.chat_template", template.as_str());
    }
    let mut hf = hf_tensors(arch, vocab_len, opts.tie);
    for (name, (shape, values)) in hf.iter_mut() {
        let gguf = gguf_name(arch, name);
        let mut stored = values.clone();
        if arch == Arch::Gemma3 && name.ends_with("norm.weight") {
            stored.iter_mut().for_each(|v| *v += 1.0);
        }
        let heads = if name.contains("q_proj") {
            HEADS
        } else {
            KV_HEADS
        };
        if arch == Arch::Llama && (name.contains("q_proj") || name.contains("k_proj")) {
            stored = permute_rows(&stored, heads, shape[0]);
        }
        if opts.quantized_q && gguf == "blk.0.attn_q.weight" {
            // The HF values are what the blocks decode to, un-permuted.
            let (bytes, decoded) = q8_0_blocks(99, stored.len());
            *values = if arch == Arch::Llama {
                inverse_permute_rows(&decoded, heads, shape[0])
            } else {
                decoded
            };
            w.add_tensor(&gguf, GgmlType::Q8_0, shape, bytes).unwrap();
            continue;
        }
        w.add_f32(&gguf, shape, &stored).unwrap();
    }
    (w.to_bytes(), hf)
}

/// The inverse of [`permute_rows`], by search (slow and obviously right).
pub fn inverse_permute_rows(values: &[f32], heads: usize, rows: usize) -> Vec<f32> {
    let cols = values.len() / rows;
    let index: Vec<f32> = (0..rows).map(|r| r as f32).collect();
    let where_to = permute_rows(&index, heads, rows);
    let mut out = vec![0f32; values.len()];
    for (to, &from) in where_to.iter().enumerate() {
        let from = from as usize;
        out[from * cols..(from + 1) * cols].copy_from_slice(&values[to * cols..(to + 1) * cols]);
    }
    out
}
