//! The model's tokenizer (`tokenizer.json`, through the `tokenizers` crate) and a streaming
//! detokenizer that turns generated token ids into UTF-8-safe text deltas.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of the tokenizer in a Hugging Face model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Errors from loading or using the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.json` is missing.
    #[error("tokenizer file {path} not found")]
    Missing {
        /// Where the file was expected.
        path: PathBuf,
    },
    /// `tokenizer.json` exists but could not be read or parsed.
    #[error("cannot load tokenizer {path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The `tokenizers` library's message.
        message: String,
    },
    /// Encoding text failed.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// Decoding ids failed (e.g. an id outside the vocabulary).
    #[error("cannot decode token ids: {0}")]
    Decode(String),
}

/// Result alias for this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// A loaded tokenizer. Cheap to clone (the vocabulary is shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    /// Ids of added tokens flagged `special`, ascending.
    special_token_ids: Arc<[u32]>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special_token_ids", &self.special_token_ids)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Tokenizer> {
        Tokenizer::from_file(&dir.join(TOKENIZER_FILE))
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        if !path.is_file() {
            return Err(TokenizerError::Missing {
                path: path.to_path_buf(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Tokenizer::from_inner(inner))
    }

    /// Wraps an already built `tokenizers::Tokenizer`.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Tokenizer {
        let mut special: Vec<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        special.sort_unstable();
        Tokenizer {
            inner: Arc::new(inner),
            special_token_ids: special.into(),
        }
    }

    /// The underlying `tokenizers` object, for anything this wrapper does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`. `add_special_tokens` runs the post-processor (e.g. a BOS token);
    /// special-token text inside `text` (like `<|user|>`) is always recognised as that token.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special_tokens` drops special tokens from the output.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// The id of a token given as its vocabulary string (e.g. `"<think>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary string of a token id (byte-level BPE tokens show as `Ġword` etc.).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens, added tokens included. The model's embedding may be larger (padded).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of the added tokens marked special, ascending.
    pub fn special_token_ids(&self) -> &[u32] {
        &self.special_token_ids
    }

    /// Whether `id` is a special token (skipped by `decode(…, true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_token_ids.binary_search(&id).is_ok()
    }

    /// A streaming detokenizer over this tokenizer.
    pub fn incremental_decoder(&self, skip_special_tokens: bool) -> IncrementalDecoder {
        IncrementalDecoder::new(self.clone(), skip_special_tokens)
    }
}

/// Streaming detokenizer: fed generated token ids one at a time, it returns the text each one
/// adds, such that the concatenation of all deltas plus [`IncrementalDecoder::finish`] equals the
/// full decode of the ids.
///
/// Decoding ids one by one and concatenating is wrong twice over: a multi-byte character may be
/// split across byte-level tokens (each half decodes to U+FFFD), and decoders such as
/// SentencePiece's strip a leading space only at the start of a sequence. So, as in `tokenizers`'
/// `DecodeStream` (and vLLM/TGI), each step decodes a small window of recent ids, compares it with
/// the previously decoded window, and emits the new suffix only once it no longer ends in U+FFFD;
/// the window then slides forward. Text that never completes (a genuinely invalid byte sequence at
/// the very end) is released by `finish`.
#[derive(Debug)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    /// Window of recent ids: already-emitted context followed by ids not yet emitted.
    window: Vec<u32>,
    /// Decoded text of `window[..prefix_len]`, which has been emitted (or is context).
    prefix: String,
    prefix_len: usize,
}

impl IncrementalDecoder {
    /// A decoder starting at the beginning of a sequence.
    pub fn new(tokenizer: Tokenizer, skip_special_tokens: bool) -> IncrementalDecoder {
        IncrementalDecoder {
            tokenizer,
            skip_special_tokens,
            window: Vec::new(),
            prefix: String::new(),
            prefix_len: 0,
        }
    }

    /// A decoder continuing after `context` (e.g. the last few prompt tokens), whose text is not
    /// emitted. With SentencePiece-style tokenizers this keeps the first generated word's leading
    /// space, which a decode starting at that token would strip. Context that ends in the middle
    /// of a character is ignored.
    pub fn with_context(
        tokenizer: Tokenizer,
        skip_special_tokens: bool,
        context: &[u32],
    ) -> Result<IncrementalDecoder> {
        let mut decoder = IncrementalDecoder::new(tokenizer, skip_special_tokens);
        let text = decoder.tokenizer.decode(context, skip_special_tokens)?;
        if !text.ends_with(char::REPLACEMENT_CHARACTER) {
            decoder.window = context.to_vec();
            decoder.prefix = text;
            decoder.prefix_len = context.len();
        }
        Ok(decoder)
    }

    /// Adds one token id; returns the text it completes (often empty: a partial character, or a
    /// skipped special token).
    pub fn push(&mut self, id: u32) -> Result<String> {
        Ok(tokenizers::tokenizer::step_decode_stream(
            &self.tokenizer.inner,
            vec![id],
            self.skip_special_tokens,
            &mut self.window,
            &mut self.prefix,
            &mut self.prefix_len,
        )
        .map_err(|e| TokenizerError::Decode(e.to_string()))?
        .unwrap_or_default())
    }

    /// Returns whatever is still held back (an unfinished character decodes as U+FFFD, as in a
    /// full decode) and resets the decoder to the start of a new sequence.
    pub fn finish(&mut self) -> Result<String> {
        let text = self
            .tokenizer
            .decode(&self.window, self.skip_special_tokens)?;
        let rest = if text.len() > self.prefix.len() && text.starts_with(&self.prefix) {
            text[self.prefix.len()..].to_string()
        } else {
            String::new()
        };
        self.window.clear();
        self.prefix.clear();
        self.prefix_len = 0;
        Ok(rest)
    }
}
