//! When generation ends and why: end-of-sequence tokens, user stop strings (matched across token
//! boundaries and never shown), the token limit and the context size; plus usage accounting.

use serde::{Deserialize, Serialize};

/// Why a completion ended, spelled as OpenAI's `finish_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string (`"stop"`).
    Stop,
    /// The token limit or the context size was reached (`"length"`).
    Length,
    /// The model ended its turn to call tools (`"tool_calls"`); set by output parsers.
    ToolCalls,
}

/// What exactly ended a completion (the detail behind a [`FinishReason`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopTrigger {
    /// The model produced this end-of-sequence token (not part of the output).
    EosToken(u32),
    /// The output contained this stop string (it and everything after it are cut).
    StopString(String),
    /// `max_tokens` completion tokens were produced.
    MaxTokens,
    /// The sequence filled the context window.
    ContextFull,
}

impl StopTrigger {
    /// The OpenAI finish reason for this trigger.
    pub fn finish_reason(&self) -> FinishReason {
        match self {
            StopTrigger::EosToken(_) | StopTrigger::StopString(_) => FinishReason::Stop,
            StopTrigger::MaxTokens | StopTrigger::ContextFull => FinishReason::Length,
        }
    }
}

/// Token-level stop conditions of one request, and its stop strings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopRules {
    /// Sorted, without duplicates.
    eos_token_ids: Vec<u32>,
    /// Most completion tokens to produce; `None` = until another rule stops.
    pub max_tokens: Option<usize>,
    /// Context window (prompt + completion tokens); `None` = unlimited.
    pub context_length: Option<usize>,
    /// Keep generating through end-of-sequence tokens (benchmarks, tests).
    pub ignore_eos: bool,
    /// Stop strings; empty strings are dropped.
    stop_strings: Vec<String>,
}

impl StopRules {
    /// Rules with these end-of-sequence tokens (e.g. `config.json`'s and `generation_config.json`'s
    /// `eos_token_id` lists chained; duplicates are fine).
    pub fn new(eos_token_ids: impl IntoIterator<Item = u32>) -> StopRules {
        let mut rules = StopRules::default();
        rules.add_eos_tokens(eos_token_ids);
        rules
    }

    /// Adds end-of-sequence tokens.
    pub fn add_eos_tokens(&mut self, ids: impl IntoIterator<Item = u32>) {
        self.eos_token_ids.extend(ids);
        self.eos_token_ids.sort_unstable();
        self.eos_token_ids.dedup();
    }

    /// Sets the completion-token limit.
    pub fn with_max_tokens(mut self, max_tokens: Option<usize>) -> StopRules {
        self.max_tokens = max_tokens;
        self
    }

    /// Sets the context window size.
    pub fn with_context_length(mut self, context_length: Option<usize>) -> StopRules {
        self.context_length = context_length;
        self
    }

    /// Sets the stop strings (empty ones are ignored).
    pub fn with_stop_strings<S: Into<String>>(
        mut self,
        stop_strings: impl IntoIterator<Item = S>,
    ) -> StopRules {
        self.stop_strings = stop_strings
            .into_iter()
            .map(Into::into)
            .filter(|s: &String| !s.is_empty())
            .collect();
        self
    }

    /// Sets whether end-of-sequence tokens are ignored.
    pub fn with_ignore_eos(mut self, ignore_eos: bool) -> StopRules {
        self.ignore_eos = ignore_eos;
        self
    }

    /// The end-of-sequence token ids, ascending.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The stop strings.
    pub fn stop_strings(&self) -> &[String] {
        &self.stop_strings
    }

    /// Whether `token` ends the sequence (always false with `ignore_eos`).
    pub fn is_eos(&self, token: u32) -> bool {
        !self.ignore_eos && self.eos_token_ids.binary_search(&token).is_ok()
    }

    /// Checks a freshly sampled `token`. `completion_tokens` and `total_tokens` (prompt +
    /// completion) count this token. An EOS token ends the completion and is not output; on
    /// `MaxTokens` or `ContextFull` the token is output and generation ends after it.
    pub fn check_token(
        &self,
        token: u32,
        completion_tokens: usize,
        total_tokens: usize,
    ) -> Option<StopTrigger> {
        if self.is_eos(token) {
            Some(StopTrigger::EosToken(token))
        } else if self.max_tokens.is_some_and(|max| completion_tokens >= max) {
            Some(StopTrigger::MaxTokens)
        } else if self.context_length.is_some_and(|len| total_tokens >= len) {
            Some(StopTrigger::ContextFull)
        } else {
            None
        }
    }

    /// A fresh matcher for this request's stop strings.
    pub fn stop_matcher(&self) -> StopMatcher {
        StopMatcher::new(self.stop_strings.iter().cloned())
    }
}

/// Result of feeding text to a [`StopMatcher`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopScan {
    /// No stop string yet; `text` is safe to show now (possibly empty while a suffix that could
    /// start a stop string is held back).
    Continue {
        /// Text to emit.
        text: String,
    },
    /// A stop string matched: emit `text` (everything before the match) and end generation.
    Stopped {
        /// Text before the stop string that had not been emitted yet.
        text: String,
        /// The stop string that matched.
        stop_string: String,
    },
}

/// Finds user stop strings in a stream of text deltas, across token boundaries.
///
/// Text that could still be the beginning of a stop string is held back until the next delta
/// decides it; the stop string itself is never emitted. When several stop strings match, the one
/// starting earliest wins (the first listed on a tie).
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stop_strings: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new<S: Into<String>>(stop_strings: impl IntoIterator<Item = S>) -> StopMatcher {
        StopMatcher {
            stop_strings: stop_strings
                .into_iter()
                .map(Into::into)
                .filter(|s: &String| !s.is_empty())
                .collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    /// Feeds the next text delta. After a stop has been reported, everything is swallowed.
    pub fn push(&mut self, delta: &str) -> StopScan {
        if self.stopped {
            return StopScan::Continue {
                text: String::new(),
            };
        }
        self.pending.push_str(delta);
        let earliest = self
            .stop_strings
            .iter()
            .enumerate()
            .filter_map(|(i, stop)| self.pending.find(stop.as_str()).map(|pos| (pos, i)))
            .min();
        if let Some((pos, index)) = earliest {
            self.stopped = true;
            let mut text = std::mem::take(&mut self.pending);
            text.truncate(pos);
            return StopScan::Stopped {
                text,
                stop_string: self.stop_strings[index].clone(),
            };
        }
        let hold_from = partial_match_start(&self.pending, &self.stop_strings);
        let held = self.pending.split_off(hold_from);
        let text = std::mem::replace(&mut self.pending, held);
        StopScan::Continue { text }
    }

    /// Releases held-back text at the end of the stream (no stop string can match any more).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Text currently held back.
    pub fn held_back(&self) -> &str {
        &self.pending
    }

    /// Whether a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }
}

/// Byte offset where the longest suffix of `text` that is a proper prefix of one of `patterns`
/// begins (`text.len()` when there is none). Text before it cannot be part of a pattern
/// occurrence that later deltas complete.
pub(crate) fn partial_match_start<S: AsRef<str>>(text: &str, patterns: &[S]) -> usize {
    let longest = patterns.iter().map(|p| p.as_ref().len()).max().unwrap_or(0);
    let earliest = text.len().saturating_sub(longest.saturating_sub(1));
    (earliest..text.len())
        .filter(|&i| text.is_char_boundary(i))
        .find(|&i| {
            let suffix = &text[i..];
            patterns.iter().any(|p| p.as_ref().starts_with(suffix))
        })
        .unwrap_or(text.len())
}

/// Token counts of one completion, as OpenAI's `usage` object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (an end-of-sequence token included, as it was computed).
    pub completion_tokens: usize,
    /// Sum of the two.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reason_and_usage_serialize_as_openai() {
        assert_eq!(
            serde_json::to_string(&FinishReason::Stop).unwrap(),
            "\"stop\""
        );
        assert_eq!(
            serde_json::to_string(&FinishReason::Length).unwrap(),
            "\"length\""
        );
        assert_eq!(
            serde_json::to_string(&FinishReason::ToolCalls).unwrap(),
            "\"tool_calls\""
        );
        assert_eq!(
            serde_json::to_value(Usage::new(7, 3)).unwrap(),
            serde_json::json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
        );
    }

    /// Feeds `pieces` and returns (emitted text, matched stop string).
    fn run(matcher: &mut StopMatcher, pieces: &[&str]) -> (String, Option<String>) {
        let mut out = String::new();
        for piece in pieces {
            match matcher.push(piece) {
                StopScan::Continue { text } => out.push_str(&text),
                StopScan::Stopped { text, stop_string } => {
                    out.push_str(&text);
                    return (out, Some(stop_string));
                }
            }
        }
        out.push_str(&matcher.finish());
        (out, None)
    }

    /// Every way of cutting `text` into 1, 2 and 3 pieces at char boundaries, and char by char.
    fn splits(text: &str) -> Vec<Vec<&str>> {
        let bounds: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        let mut out = vec![vec![text]];
        for &a in &bounds {
            out.push(vec![&text[..a], &text[a..]]);
            for &b in bounds.iter().filter(|&&b| b >= a) {
                out.push(vec![&text[..a], &text[a..b], &text[b..]]);
            }
        }
        let chars: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
        out.push(chars);
        out
    }

    #[test]
    fn stop_strings_match_across_every_split() {
        let cases: &[(&str, &[&str], &str, Option<&str>)] = &[
            (
                "Hello world STOP more",
                &["STOP"],
                "Hello world ",
                Some("STOP"),
            ),
            ("no stop here", &["STOP"], "no stop here", None),
            ("ends with ST", &["STOP"], "ends with ST", None),
            ("aaab tail", &["aab"], "a", Some("aab")),
            (
                "x<|im_end|>y",
                &["<|im_end|>", "|>y"],
                "x",
                Some("<|im_end|>"),
            ),
            ("café! ok", &["é!"], "caf", Some("é!")),
            ("one\n\ntwo", &["\n\n", "two"], "one", Some("\n\n")),
            ("日本語のテキスト", &["のテ"], "日本語", Some("のテ")),
            ("abcabd", &["abd", "cab"], "ab", Some("cab")),
        ];
        for &(text, stops, expected, stop) in cases {
            for pieces in splits(text) {
                let mut matcher = StopMatcher::new(stops.iter().copied());
                let (out, matched) = run(&mut matcher, &pieces);
                assert_eq!(out, expected, "{text:?} split as {pieces:?}");
                assert_eq!(matched.as_deref(), stop, "{text:?} split as {pieces:?}");
            }
        }
    }

    #[test]
    fn partial_prefixes_are_held_back_until_decided() {
        let mut matcher = StopMatcher::new(["</answer>"]);
        assert_eq!(
            matcher.push("42</an"),
            StopScan::Continue { text: "42".into() }
        );
        assert_eq!(matcher.held_back(), "</an");
        assert_eq!(
            matcher.push("d"),
            StopScan::Continue {
                text: "</and".into()
            }
        );
        assert_eq!(
            matcher.push(" </answer> ignored"),
            StopScan::Stopped {
                text: " ".into(),
                stop_string: "</answer>".into()
            }
        );
        assert!(matcher.is_stopped());
        assert_eq!(matcher.push("more"), StopScan::Continue { text: "".into() });
        assert_eq!(matcher.finish(), "");
    }

    #[test]
    fn no_stop_strings_pass_everything() {
        let mut matcher = StopMatcher::new(["", ""]);
        assert_eq!(
            matcher.push("abc"),
            StopScan::Continue { text: "abc".into() }
        );
        assert_eq!(matcher.finish(), "");
    }

    #[test]
    fn token_rules() {
        let rules = StopRules::new([2037, 2028, 2035, 2028])
            .with_max_tokens(Some(3))
            .with_context_length(Some(10));
        assert_eq!(rules.eos_token_ids(), [2028, 2035, 2037]);
        assert_eq!(rules.check_token(5, 1, 6), None);
        assert_eq!(
            rules.check_token(2035, 1, 6),
            Some(StopTrigger::EosToken(2035))
        );
        assert_eq!(rules.check_token(5, 3, 8), Some(StopTrigger::MaxTokens));
        assert_eq!(rules.check_token(5, 2, 10), Some(StopTrigger::ContextFull));
        // EOS wins over the limits (the EOS token is not output either way).
        assert_eq!(
            rules.check_token(2028, 3, 10),
            Some(StopTrigger::EosToken(2028))
        );
        let rules = rules.with_ignore_eos(true);
        assert_eq!(rules.check_token(2035, 1, 6), None);
        assert_eq!(StopTrigger::EosToken(1).finish_reason(), FinishReason::Stop);
        assert_eq!(
            StopTrigger::StopString("x".into()).finish_reason(),
            FinishReason::Stop
        );
        assert_eq!(StopTrigger::MaxTokens.finish_reason(), FinishReason::Length);
        assert_eq!(
            StopTrigger::ContextFull.finish_reason(),
            FinishReason::Length
        );
        let rules = StopRules::new([]).with_stop_strings(["", "END"]);
        assert_eq!(rules.stop_strings(), ["END"]);
        let mut matcher = rules.stop_matcher();
        assert!(matches!(matcher.push("xENDy"), StopScan::Stopped { .. }));
    }

    #[test]
    fn partial_match_start_respects_char_boundaries() {
        assert_eq!(partial_match_start("abc<th", &["<think>"]), 3);
        assert_eq!(partial_match_start("abc", &["<think>"]), 3);
        assert_eq!(partial_match_start("aé", &["éx"]), 1);
        assert_eq!(partial_match_start("x", &[] as &[&str]), 1);
        // Only proper prefixes are held back: the caller finds full occurrences first.
        assert_eq!(partial_match_start("<a", &["<a"]), 2);
        assert_eq!(partial_match_start("x<", &["<a"]), 1);
    }
}
