//! Streaming generation on the tiny float GLM fixture: greedy tokens equal transformers',
//! stop strings that span tokens cut the text, seeded sampling repeats, limits report
//! `length`, and a follow-up prompt reuses the cached prefix.

use std::ops::ControlFlow;
use trellis_backend::KvDtype;
use trellis_backend::cpu::CpuBackend;
use trellis_format::ModelDir;
use trellis_runtime::engine::{Engine, EngineOptions};
use trellis_runtime::generation::{Completion, GenerationRequest, generate};
use trellis_runtime::sampler::SamplingParams;
use trellis_runtime::stop::{FinishReason, StopTrigger};
use trellis_runtime::tokenizer::Tokenizer;
use trellis_testutil::{TensorFile, fixture};

const PROMPT: &str =
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small town by the sea,";

fn setup() -> (Engine<CpuBackend>, Tokenizer, Vec<u32>) {
    let path = fixture("hf/glm4-moe-lite-tiny");
    let dir = ModelDir::open(&path).unwrap();
    let options = EngineOptions {
        ctx_size: Some(256),
        kv_dtype: KvDtype::F32,
        ..EngineOptions::default()
    };
    let engine = Engine::load(&dir, CpuBackend::new(), &options, &mut |_, _, _| {}).unwrap();
    let tokenizer = Tokenizer::from_model_dir(&path).unwrap();
    let prompt = tokenizer.encode(PROMPT, false).unwrap();
    (engine, tokenizer, prompt)
}

fn run(
    engine: &mut Engine<CpuBackend>,
    tok: &Tokenizer,
    prompt: &[u32],
    request: &GenerationRequest,
) -> (Completion, String) {
    let mut streamed = String::new();
    let completion = generate(engine, tok, prompt, request, &mut |e| {
        streamed.push_str(e.text);
        ControlFlow::Continue(())
    })
    .unwrap();
    (completion, streamed)
}

#[test]
fn greedy_stream_matches_reference_and_stops_on_strings() {
    let (mut engine, tok, prompt) = setup();
    let reference = TensorFile::open(fixture(
        "ref/hf/glm4-moe-lite-tiny/reference_hf.safetensors",
    ));
    let want: Vec<u32> = reference
        .i64("greedy_ids")
        .data
        .iter()
        .map(|&v| v as u32)
        .collect();
    assert_eq!(
        prompt,
        reference
            .i64("prompt_ids")
            .data
            .iter()
            .map(|&v| v as u32)
            .collect::<Vec<_>>()
    );

    let request = GenerationRequest {
        max_tokens: 12,
        ignore_eos: true,
        ..GenerationRequest::default()
    };
    let (full, streamed) = run(&mut engine, &tok, &prompt, &request);
    assert_eq!(full.tokens, want[..12]);
    assert_eq!(streamed, full.text);
    assert_eq!(full.text, tok.decode(&want[..12], false).unwrap());
    assert_eq!(full.finish_reason, FinishReason::Length);
    assert_eq!(full.trigger, Some(StopTrigger::MaxTokens));

    // A stop string made of the end of one token and the start of the next.
    let first = tok.decode(&want[..3], false).unwrap();
    let boundary = first.len();
    let text = &full.text;
    let start = (1..=2)
        .map(|k| boundary - k)
        .find(|&i| text.is_char_boundary(i))
        .unwrap();
    let end = (boundary + 2..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap();
    let stop = text[start..end].to_string();
    let expected = &text[..text.find(&stop).unwrap()];
    let request = GenerationRequest {
        max_tokens: 12,
        stop: vec![stop.clone()],
        ignore_eos: true,
        ..GenerationRequest::default()
    };
    let (cut, streamed) = run(&mut engine, &tok, &prompt, &request);
    assert_eq!(cut.text, expected, "stop string {stop:?}");
    assert_eq!(
        streamed, expected,
        "the stop string never reaches the stream"
    );
    assert_eq!(cut.finish_reason, FinishReason::Stop);
    assert_eq!(cut.trigger, Some(StopTrigger::StopString(stop)));
}

#[test]
fn seeded_sampling_repeats_and_follow_up_prompt_reuses_the_cache() {
    let (mut engine, tok, prompt) = setup();
    let sampled = |seed| GenerationRequest {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        max_tokens: 16,
        ignore_eos: true,
        ..GenerationRequest::default()
    };
    let (a, _) = run(&mut engine, &tok, &prompt, &sampled(42));
    let (b, _) = run(&mut engine, &tok, &prompt, &sampled(42));
    let (c, _) = run(&mut engine, &tok, &prompt, &sampled(7));
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    assert_ne!(a.tokens, c.tokens, "another seed gives another sample");
    // The second run found the whole prompt but its last token in the cache.
    assert_eq!(b.stats.prefilled_tokens, 1);

    // A follow-up turn: prompt + answer + new text only computes what is new.
    let mut follow_up = prompt.clone();
    follow_up.extend_from_slice(&c.tokens);
    follow_up.extend(tok.encode(" And then", false).unwrap());
    let (d, _) = run(&mut engine, &tok, &follow_up, &sampled(1));
    let new = follow_up.len() - prompt.len() - c.tokens.len();
    // The last generated token was never decoded into the cache, so it is computed too.
    assert_eq!(d.stats.prefilled_tokens, new + 1);
}

#[test]
fn context_limit_ends_with_length() {
    let path = fixture("hf/glm4-moe-lite-tiny");
    let dir = ModelDir::open(&path).unwrap();
    let options = EngineOptions {
        ctx_size: Some(40),
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(&dir, CpuBackend::new(), &options, &mut |_, _, _| {}).unwrap();
    let tok = Tokenizer::from_model_dir(&path).unwrap();
    let prompt = tok.encode(PROMPT, false).unwrap();
    let request = GenerationRequest {
        max_tokens: 100,
        ignore_eos: true,
        ..GenerationRequest::default()
    };
    let (done, _) = run(&mut engine, &tok, &prompt, &request);
    assert_eq!(done.trigger, Some(StopTrigger::ContextFull));
    assert_eq!(done.finish_reason, FinishReason::Length);
    assert_eq!(
        prompt.len() + done.tokens.len(),
        41,
        "the context holds 40; the last token is emitted without being cached"
    );
}

/// The backend's greedy choice (one id read back) is the host's argmax of the same logits, step
/// by step, and a greedy generation through it equals one that reads every step's logits.
#[test]
fn greedy_steps_on_the_backend_equal_the_host_argmax() {
    let (mut engine, _, prompt) = setup();
    let mut host_tokens = Vec::new();
    engine
        .generate_with(
            &prompt,
            12,
            |l| trellis_backend::argmax(l).unwrap(),
            &mut |t| {
                host_tokens.push(t);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    engine.reset();
    let mut backend_tokens = Vec::new();
    let stats = engine
        .generate_greedy_with(&prompt, 12, &mut |t| {
            backend_tokens.push(t);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(stats.generated_tokens, 12);
    assert_eq!(backend_tokens, host_tokens);
    let distinct: std::collections::HashSet<_> = host_tokens.iter().collect();
    assert!(
        distinct.len() > 1,
        "a constant stream proves little: {host_tokens:?}"
    );

    // One step each way from the same state.
    engine.reset();
    engine.prefill(&prompt).unwrap();
    let snapshot = engine.history().to_vec();
    let host = trellis_backend::argmax(engine.step(host_tokens[0]).unwrap()).unwrap();
    engine.reset();
    engine.prefill(&snapshot).unwrap();
    assert_eq!(engine.step_greedy(host_tokens[0]).unwrap(), host);
}
