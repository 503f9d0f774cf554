//! The tiny GLM tokenizer against `tokenizer_cases.json` (made with the `tokenizers` library), and
//! the streaming detokenizer against full decodes.

use serde_json::Value;
use trellis_runtime::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};
use trellis_testutil::fixture;

const GLM_DIR: &str = "exl3/glm4-moe-lite-tiny-4.0bpw";

fn glm_tokenizer() -> Tokenizer {
    Tokenizer::from_model_dir(&fixture(GLM_DIR)).expect("load the tiny GLM tokenizer")
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixture("tokenizer_cases.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let cases = json["models"]["glm4-moe-lite-tiny"]["cases"]
        .as_array()
        .expect("cases list")
        .clone();
    assert_eq!(cases.len(), 15);
    cases
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn encode_decode_and_tokens_match_the_reference() {
    let tokenizer = glm_tokenizer();
    for case in cases() {
        let text = case["text"].as_str().unwrap();
        let expected_ids = ids(&case["ids"]);
        assert_eq!(
            tokenizer.encode(text, true).unwrap(),
            expected_ids,
            "{text:?}"
        );
        assert_eq!(
            tokenizer.encode(text, false).unwrap(),
            ids(&case["ids_no_special"]),
            "{text:?}"
        );
        let tokens: Vec<String> = expected_ids
            .iter()
            .map(|&id| tokenizer.id_to_token(id).unwrap())
            .collect();
        let expected_tokens: Vec<&str> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(tokens, expected_tokens, "{text:?}");
        for (token, &id) in expected_tokens.iter().zip(&expected_ids) {
            assert_eq!(tokenizer.token_to_id(token), Some(id));
        }
        assert_eq!(
            tokenizer.decode(&expected_ids, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
        assert_eq!(
            tokenizer.decode(&expected_ids, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn vocabulary_and_special_tokens() {
    let tokenizer = glm_tokenizer();
    assert_eq!(tokenizer.vocab_size(), 2048);
    let special: Vec<u32> = (2028..2048).collect();
    assert_eq!(tokenizer.special_token_ids(), special.as_slice());
    assert!(tokenizer.is_special(2038));
    assert!(!tokenizer.is_special(2027));
    assert_eq!(tokenizer.token_to_id("<think>"), Some(2038));
    assert_eq!(tokenizer.id_to_token(2041).as_deref(), Some("</tool_call>"));
}

fn stream(decoder: &mut IncrementalDecoder, ids: &[u32]) -> (String, Vec<String>) {
    let mut deltas = Vec::new();
    for &id in ids {
        deltas.push(decoder.push(id).unwrap());
    }
    deltas.push(decoder.finish().unwrap());
    (deltas.concat(), deltas)
}

#[test]
fn incremental_decoding_concatenates_to_the_full_decode() {
    let tokenizer = glm_tokenizer();
    for case in cases() {
        let ids = ids(&case["ids"]);
        for skip in [false, true] {
            let mut decoder = tokenizer.incremental_decoder(skip);
            let (text, deltas) = stream(&mut decoder, &ids);
            assert_eq!(text, tokenizer.decode(&ids, skip).unwrap(), "skip={skip}");
            for delta in &deltas {
                assert!(
                    !delta.contains(char::REPLACEMENT_CHARACTER),
                    "delta {delta:?} of {:?} holds a replacement character",
                    case["text"]
                );
            }
            // The decoder resets after `finish`: a second sequence decodes the same way.
            assert_eq!(stream(&mut decoder, &ids).0, text);
        }
    }
}

#[test]
fn incremental_decoder_holds_back_split_characters() {
    let tokenizer = glm_tokenizer();
    // "🙂" is four bytes; the byte-level vocabulary spells it with several tokens.
    let ids = tokenizer.encode("a🙂", false).unwrap();
    assert!(ids.len() >= 3, "{ids:?}");
    let mut decoder = tokenizer.incremental_decoder(false);
    let deltas: Vec<String> = ids.iter().map(|&id| decoder.push(id).unwrap()).collect();
    assert_eq!(deltas.first().map(String::as_str), Some("a"));
    assert_eq!(deltas.last().map(String::as_str), Some("🙂"));
    assert!(deltas[1..deltas.len() - 1].iter().all(String::is_empty));
    assert_eq!(decoder.finish().unwrap(), "");

    // An unfinished character is flushed by `finish`, as the full decode shows it.
    let partial = &ids[..ids.len() - 1];
    let mut decoder = tokenizer.incremental_decoder(false);
    let (text, _) = stream(&mut decoder, partial);
    assert_eq!(text, tokenizer.decode(partial, false).unwrap());
    assert!(text.ends_with(char::REPLACEMENT_CHARACTER));
}

#[test]
fn incremental_decoder_with_context_emits_only_new_text() {
    let tokenizer = glm_tokenizer();
    let prompt = tokenizer.encode("Hello world", false).unwrap();
    let generated = tokenizer.encode(" and more", false).unwrap();
    let mut decoder =
        IncrementalDecoder::with_context(tokenizer.clone(), false, &prompt[prompt.len() - 2..])
            .unwrap();
    let (text, _) = stream(&mut decoder, &generated);
    assert_eq!(text, " and more");
}

#[test]
fn missing_tokenizer_names_the_file() {
    let dir = std::env::temp_dir().join("trellis-no-tokenizer-here");
    let err = Tokenizer::from_model_dir(&dir).unwrap_err();
    assert!(matches!(err, TokenizerError::Missing { .. }));
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn invalid_tokenizer_names_the_file() {
    let dir = std::env::temp_dir().join(format!("trellis-bad-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
    let err = Tokenizer::from_model_dir(&dir).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(err, TokenizerError::Load { .. }));
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}
