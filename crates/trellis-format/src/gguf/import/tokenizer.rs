//! The GGUF tokenizer (`tokenizer.ggml.*`) → Hugging Face `tokenizer.json` and
//! `tokenizer_config.json`.
//!
//! * `llama` (SentencePiece vocabularies: Gemma, Llama 2, Mistral): llama.cpp tokenizes these
//!   by repeatedly merging the adjacent pair whose concatenation is the highest-scoring
//!   vocabulary piece, falling back to `<0xXX>` byte tokens. That is BPE whose merge list is
//!   every split `(left, right)` of a normal piece into two vocabulary pieces, ranked by the
//!   piece's score — the same construction transformers uses to convert SentencePiece BPE
//!   models. Spaces become `▁` (with a leading `▁` when `add_space_prefix` is set).
//! * `gpt2` (byte-level BPE: Llama 3, Qwen): the stored merges, with the pre-tokenizer regex
//!   that `tokenizer.ggml.pre` names.
//!
//! Control tokens become special added tokens and user-defined tokens plain added tokens, so
//! they are matched whole before the model runs, as in SentencePiece and llama.cpp.
//!
//! One SentencePiece detail follows Hugging Face rather than llama.cpp: llama.cpp's converter
//! stores user-defined whitespace pieces (Gemma's `"  "`, `"   "`, …) with real spaces, where
//! SentencePiece and Hugging Face spell them `▁▁`, match them after spaces became `▁`, and
//! reach them by merges early in the merge order (their vocabulary position). They are
//! respelled and merged here the same way, so text that contains a literal `▁` (U+2581)
//! tokenizes as transformers does; llama.cpp differs on such text only.

use super::super::{GgufError, GgufFile, Result};
use super::config::SpecialIds;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

/// SentencePiece / llama.cpp token types (`tokenizer.ggml.token_type`).
const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Texts that llama.cpp treats as end of generation when they are vocabulary tokens; added
/// to `generation_config.json`'s stop ids so chat models stop at the end of their turn.
const END_OF_GENERATION_TEXTS: [&str; 7] = [
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
];

/// Llama 3's pre-tokenizer split (`tokenizer.ggml.pre` = `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's (`qwen2`): as Llama 3's but digits one at a time.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer files of a Hugging Face directory, plus the ids the configs need.
pub(crate) struct TokenizerFiles {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    pub special: SpecialIds,
    /// `eos_token_id` of `generation_config.json`: EOS first, then other end-of-turn tokens.
    pub stop_ids: Vec<u32>,
    pub vocab_size: usize,
    /// Things a user should know (e.g. a guessed pre-tokenizer).
    pub notes: Vec<String>,
}

struct Vocab {
    /// Token texts, whitespace pieces of SentencePiece vocabularies respelled with `▁`.
    tokens: Vec<String>,
    types: Vec<i64>,
    scores: Vec<f64>,
    /// Tokens that BPE reaches by merging: normal pieces and the respelled whitespace ones.
    mergeable: Vec<bool>,
}

impl Vocab {
    /// Whether token `i` is matched whole before BPE runs.
    fn is_added(&self, i: usize) -> bool {
        let t = self.types[i];
        (t == CONTROL || t == USER_DEFINED || t == UNKNOWN) && !self.mergeable[i]
    }
}

/// A user-defined piece of spaces only, as llama.cpp's converter writes Gemma's whitespace
/// tokens, in SentencePiece's spelling; `None` for any other token.
fn respelled_whitespace(token: &str) -> Option<String> {
    (!token.is_empty() && token.bytes().all(|b| b == b' ')).then(|| token.replace(' ', "▁"))
}

pub(crate) fn build(gguf: &GgufFile, context_length: Option<usize>) -> Result<TokenizerFiles> {
    let model = gguf.req_str("tokenizer.ggml.model")?;
    let tokens = gguf
        .opt_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| gguf.metadata_error("tokenizer.ggml.tokens", "missing"))?;
    let tokens = tokens.as_strings().ok_or_else(|| {
        gguf.metadata_error(
            "tokenizer.ggml.tokens",
            format!(
                "expected an array of strings, got {}",
                tokens.element_type()
            ),
        )
    })?;
    if tokens.is_empty() || tokens.len() > u32::MAX as usize {
        return Err(gguf.metadata_error(
            "tokenizer.ggml.tokens",
            format!("{} tokens (expected 1..2^32)", tokens.len()),
        ));
    }
    let n = tokens.len();
    let per_token = |key: &str, to: fn(&super::super::GgufArray) -> Option<Vec<f64>>| match gguf
        .opt_array(key)?
    {
        None => Ok(None),
        Some(array) => match to(array) {
            Some(values) if values.len() == n => Ok(Some(values)),
            Some(values) => Err(gguf.metadata_error(
                key,
                format!("has {} entries, expected one per token ({n})", values.len()),
            )),
            None => Err(gguf.metadata_error(
                key,
                format!("expected numbers, got {}", array.element_type()),
            )),
        },
    };
    let scores = per_token("tokenizer.ggml.scores", |a| a.to_f64s())?;
    let types = per_token("tokenizer.ggml.token_type", |a| {
        a.to_i64s()
            .map(|v| v.into_iter().map(|x| x as f64).collect())
    })?;
    let types: Vec<i64> = types.map_or_else(
        || vec![NORMAL; n],
        |t| t.into_iter().map(|x| x as i64).collect(),
    );
    let is_spm = match model {
        "llama" => true,
        "gpt2" => false,
        other => {
            return Err(GgufError::Unsupported {
                file: gguf.path().to_path_buf(),
                what: format!(
                    "tokenizer.ggml.model = {other:?}: import supports \"llama\" \
                     (SentencePiece) and \"gpt2\" (byte-level BPE)"
                ),
            });
        }
    };
    let mut texts = tokens.to_vec();
    let mut mergeable: Vec<bool> = types.iter().map(|&t| t == NORMAL).collect();
    if is_spm {
        let existing: std::collections::HashSet<&str> = tokens.iter().map(String::as_str).collect();
        for i in 0..n {
            if types[i] != USER_DEFINED {
                continue;
            }
            if let Some(spelled) = respelled_whitespace(&tokens[i])
                && !existing.contains(spelled.as_str())
            {
                texts[i] = spelled;
                mergeable[i] = true;
            }
        }
    }
    let vocab = Vocab {
        tokens: texts,
        types,
        scores: scores.unwrap_or_else(|| vec![0.0; n]),
        mergeable,
    };

    let id = |key: &str| -> Result<Option<u32>> {
        match gguf.opt_u64(key)? {
            None => Ok(None),
            Some(v) if (v as usize) < n => Ok(Some(v as u32)),
            // llama.cpp writes -1 as u32::MAX for "none" in a few converters.
            Some(v) if v == u64::from(u32::MAX) => Ok(None),
            Some(v) => Err(gguf.metadata_error(
                key,
                format!("token id {v} is outside the vocabulary of {n}"),
            )),
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let unk = id("tokenizer.ggml.unknown_token_id")?;
    let pad = id("tokenizer.ggml.padding_token_id")?;
    let eot = id("tokenizer.ggml.eot_token_id")?;
    let eom = id("tokenizer.ggml.eom_token_id")?;
    // llama.cpp's defaults when the flags are absent: SentencePiece vocabularies add BOS.
    let add_bos = gguf
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(is_spm);
    let add_eos = gguf
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let add_space_prefix = gguf
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(is_spm);
    let mut notes = Vec::new();

    let text = |id: Option<u32>| id.map(|i| vocab.tokens[i as usize].clone());
    let mut model_json = if is_spm {
        spm_model(&vocab, text(unk))
    } else {
        gpt2_model(gguf, &vocab)?
    };
    let (normalizer, pre_tokenizer, decoder) = if is_spm {
        spm_pipeline(add_space_prefix)
    } else {
        let pre = gguf.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let split = match pre {
            "llama-bpe" | "llama3" | "smaug-bpe" => Some(LLAMA3_SPLIT),
            "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_SPLIT),
            "default" | "gpt-2" | "gpt2" => None,
            other => {
                notes.push(format!(
                    "tokenizer.ggml.pre = {other:?} is not known to import; used GPT-2's \
                     pre-tokenizer, which may split some text differently"
                ));
                None
            }
        };
        if pre == "llama-bpe" || pre == "llama3" {
            // Llama 3's tokenizer.json looks whole words up before merging.
            model_json["ignore_merges"] = json!(true);
        }
        byte_level_pipeline(split)
    };

    let added_tokens: Vec<Value> = vocab
        .types
        .iter()
        .enumerate()
        .filter(|&(i, _)| vocab.is_added(i))
        .map(|(i, &t)| {
            json!({
                "id": i,
                "content": vocab.tokens[i],
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": t != USER_DEFINED,
            })
        })
        .collect();
    let post_processor = template_processing(
        bos.filter(|_| add_bos)
            .map(|i| (vocab.tokens[i as usize].clone(), i)),
        eos.filter(|_| add_eos)
            .map(|i| (vocab.tokens[i as usize].clone(), i)),
    );
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model_json,
    });

    let mut config = Map::new();
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(add_eos));
    for (key, id) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ] {
        config.insert(key.into(), text(id).map_or(Value::Null, Value::String));
    }
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(length) = context_length {
        config.insert("model_max_length".into(), json!(length));
    }
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    if let Some(template) = gguf.opt_str("tokenizer.chat_template")? {
        config.insert("chat_template".into(), json!(template));
    }

    let mut stop_ids: Vec<u32> = Vec::new();
    let mut stop = |id: u32| {
        if !stop_ids.contains(&id) {
            stop_ids.push(id);
        }
    };
    eos.into_iter().chain(eot).chain(eom).for_each(&mut stop);
    for (i, token) in vocab.tokens.iter().enumerate() {
        if vocab.types[i] == CONTROL && END_OF_GENERATION_TEXTS.contains(&token.as_str()) {
            stop(i as u32);
        }
    }

    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: Value::Object(config),
        special: SpecialIds { bos, eos, pad },
        stop_ids,
        vocab_size: n,
        notes,
    })
}

/// `{token: id}`; when a text occurs twice the first id keeps it (tokenizers maps each text
/// to one id).
fn vocab_object(tokens: &[String]) -> Map<String, Value> {
    let mut map = Map::new();
    for (i, token) in tokens.iter().enumerate() {
        map.entry(token.clone()).or_insert_with(|| json!(i));
    }
    map
}

/// BPE over SentencePiece pieces: merges from scores, byte fallback.
fn spm_model(vocab: &Vocab, unk: Option<String>) -> Value {
    let mut ids: HashMap<&str, u32> = HashMap::with_capacity(vocab.tokens.len());
    for (i, token) in vocab.tokens.iter().enumerate() {
        ids.entry(token.as_str()).or_insert(i as u32);
    }
    // SentencePiece BPE vocabularies list pieces in merge order with scores falling along
    // it; then the position is the rank, and it also places the respelled whitespace pieces
    // (score −1000, listed early) where SentencePiece matches them: first. Vocabularies whose
    // scores do not follow their order are ranked by score, as llama.cpp merges them.
    let normal_scores = (0..vocab.tokens.len())
        .filter(|&i| vocab.types[i] == NORMAL)
        .map(|i| vocab.scores[i]);
    let by_position = normal_scores
        .clone()
        .zip(normal_scores.skip(1))
        .all(|(a, b)| a >= b);
    // (rank key: higher merges first, merged id, left id, right id)
    let mut merges: Vec<(f64, u32, u32, u32)> = Vec::new();
    for (merged, token) in vocab.tokens.iter().enumerate() {
        if !vocab.mergeable[merged] || ids[token.as_str()] != merged as u32 {
            continue;
        }
        let rank = if by_position {
            -(merged as f64)
        } else {
            vocab.scores[merged]
        };
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                merges.push((rank, merged as u32, l, r));
            }
        }
    }
    // Ties (equal scores, or one piece reachable by several splits) in vocabulary order, as
    // transformers' SentencePiece converter orders them.
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let merges: Vec<Value> = merges
        .iter()
        .map(|&(_, _, l, r)| json!([vocab.tokens[l as usize], vocab.tokens[r as usize]]))
        .collect();
    json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": unk,
        "continuing_subword_prefix": null,
        "end_of_word_suffix": null,
        "fuse_unk": true,
        "byte_fallback": true,
        "ignore_merges": false,
        "vocab": vocab_object(&vocab.tokens),
        "merges": merges,
    })
}

/// Byte-level BPE with the stored merges.
fn gpt2_model(gguf: &GgufFile, vocab: &Vocab) -> Result<Value> {
    let key = "tokenizer.ggml.merges";
    let merges = gguf
        .opt_array(key)?
        .ok_or_else(|| gguf.metadata_error(key, "missing (a gpt2 tokenizer needs merges)"))?;
    let merges = merges
        .as_strings()
        .ok_or_else(|| gguf.metadata_error(key, "expected an array of strings"))?;
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, merge) in merges.iter().enumerate() {
        let (left, right) = merge.split_once(' ').ok_or_else(|| {
            gguf.metadata_error(
                key,
                format!("entry {i} ({merge:?}) is not two tokens separated by a space"),
            )
        })?;
        pairs.push(json!([left, right]));
    }
    Ok(json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": null,
        "continuing_subword_prefix": null,
        "end_of_word_suffix": null,
        "fuse_unk": false,
        "byte_fallback": false,
        "ignore_merges": false,
        "vocab": vocab_object(&vocab.tokens),
        "merges": pairs,
    }))
}

/// Normalizer, pre-tokenizer and decoder of a SentencePiece vocabulary.
fn spm_pipeline(add_space_prefix: bool) -> (Value, Value, Value) {
    let underline_to_space = json!({
        "type": "Replace", "pattern": { "String": "▁" }, "content": " "
    });
    let mut decoders = vec![
        underline_to_space,
        json!({ "type": "ByteFallback" }),
        json!({ "type": "Fuse" }),
    ];
    if add_space_prefix {
        // Metaspace turns spaces into ▁ and prepends one to the first word only; the
        // decoder strips that leading space again.
        decoders.push(json!({ "type": "Strip", "content": " ", "start": 1, "stop": 0 }));
        (
            Value::Null,
            json!({
                "type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false
            }),
            json!({ "type": "Sequence", "decoders": decoders }),
        )
    } else {
        (
            json!({ "type": "Replace", "pattern": { "String": " " }, "content": "▁" }),
            Value::Null,
            json!({ "type": "Sequence", "decoders": decoders }),
        )
    }
}

/// Pre-tokenizer and decoder of a byte-level BPE vocabulary; `split` is the word-splitting
/// regex (`None`: GPT-2's, built into the ByteLevel pre-tokenizer).
fn byte_level_pipeline(split: Option<&str>) -> (Value, Value, Value) {
    let byte_level = |use_regex: bool| {
        json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": use_regex
        })
    };
    let pre_tokenizer = match split {
        Some(regex) => json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split", "pattern": { "Regex": regex },
                    "behavior": "Isolated", "invert": false
                },
                byte_level(false),
            ],
        }),
        None => byte_level(true),
    };
    (Value::Null, pre_tokenizer, byte_level(true))
}

/// A post-processor that adds BOS and/or EOS around each sequence; `null` when it adds none.
fn template_processing(bos: Option<(String, u32)>, eos: Option<(String, u32)>) -> Value {
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let special =
        |token: &str, type_id: u32| json!({ "SpecialToken": { "id": token, "type_id": type_id } });
    let sequence = |id: &str, type_id: u32| json!({ "Sequence": { "id": id, "type_id": type_id } });
    let wrap = |id: &str, type_id: u32| {
        let mut items = Vec::new();
        if let Some((token, _)) = &bos {
            items.push(special(token, type_id));
        }
        items.push(sequence(id, type_id));
        if let Some((token, _)) = &eos {
            items.push(special(token, type_id));
        }
        items
    };
    let single = wrap("A", 0);
    let mut pair = wrap("A", 0);
    pair.extend(wrap("B", 1));
    let mut special_tokens = Map::new();
    for (token, id) in bos.iter().chain(eos.iter()) {
        special_tokens.insert(
            token.clone(),
            json!({ "id": token, "ids": [id], "tokens": [token] }),
        );
    }
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    })
}
