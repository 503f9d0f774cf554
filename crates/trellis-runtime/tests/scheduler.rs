//! Continuous batching on the EXL3 GLM fixture: several concurrent greedy requests give the
//! same tokens as each alone; a cancelled sequence stops at once and frees its blocks; bad
//! requests are refused at submission.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use trellis_backend::KvDtype;
use trellis_backend::cpu::CpuBackend;
use trellis_format::ModelDir;
use trellis_runtime::engine::{Engine, EngineOptions};
use trellis_runtime::generation::{GenerationRequest, generate};
use trellis_runtime::scheduler::{
    self, SchedulerConfig, SequenceEvent, SubmitError, SubmitRequest,
};
use trellis_runtime::stop::FinishReason;
use trellis_runtime::tokenizer::Tokenizer;
use trellis_testutil::fixture;

const MODEL: &str = "exl3/glm4-moe-lite-tiny-4.0bpw";

fn options(max_batch: usize) -> EngineOptions {
    EngineOptions {
        ctx_size: Some(256),
        prefill_chunk: 16,
        kv_dtype: KvDtype::F32,
        max_batch,
        ..EngineOptions::default()
    }
}

fn start(max_batch: usize) -> (scheduler::SchedulerHandle, Tokenizer) {
    let path = fixture(MODEL);
    let tokenizer = Tokenizer::from_model_dir(&path).unwrap();
    let handle = scheduler::spawn(
        move || {
            let dir = ModelDir::open(&path)?;
            Engine::load(
                &dir,
                CpuBackend::new(),
                &options(max_batch),
                &mut |_, _, _| {},
            )
        },
        tokenizer.clone(),
        SchedulerConfig { max_queue: 16 },
    )
    .unwrap();
    (handle, tokenizer)
}

fn request(max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        max_tokens,
        ignore_eos: true,
        ..GenerationRequest::default()
    }
}

/// Submit and return a receiver of the sequence's events.
fn submit(
    handle: &scheduler::SchedulerHandle,
    prompt: Vec<u32>,
    generation: GenerationRequest,
) -> (mpsc::Receiver<SequenceEvent>, Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    handle
        .submit(SubmitRequest {
            prompt,
            generation,
            sink: Box::new(move |e| tx.send(e).is_ok()),
            cancel: cancel.clone(),
        })
        .unwrap();
    (rx, cancel)
}

fn collect(rx: &mpsc::Receiver<SequenceEvent>) -> (Vec<u32>, String, FinishReason) {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    loop {
        match rx.recv().expect("the sequence ends with Done") {
            SequenceEvent::Token { token, text: t } => {
                tokens.push(token);
                text.push_str(&t);
            }
            SequenceEvent::Done {
                text: t,
                finish_reason,
                ..
            } => {
                text.push_str(&t);
                return (tokens, text, finish_reason);
            }
            SequenceEvent::Failed(e) => panic!("sequence failed: {e}"),
        }
    }
}

#[test]
fn batched_greedy_equals_single_sequence() {
    let prompts = [
        "The quick brown fox jumps over the lazy dog.",
        "Once upon a time, in a small town by the sea, there lived",
        "It was the best of times",
        "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse",
    ];
    let (handle, tokenizer) = start(4);
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tokenizer.encode(p, false).unwrap())
        .collect();
    let receivers: Vec<_> = encoded
        .iter()
        .map(|p| submit(&handle, p.clone(), request(12)).0)
        .collect();
    let batched: Vec<_> = receivers.iter().map(collect).collect();

    let dir = ModelDir::open(&fixture(MODEL)).unwrap();
    let mut single = Engine::load(&dir, CpuBackend::new(), &options(1), &mut |_, _, _| {}).unwrap();
    for (prompt, (tokens, text, finish)) in encoded.iter().zip(&batched) {
        let alone = generate(&mut single, &tokenizer, prompt, &request(12), &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(tokens, &alone.tokens, "prompt {prompt:?}");
        assert_eq!(text, &alone.text);
        assert_eq!(*finish, FinishReason::Length);
    }
    let m = handle.metrics();
    assert_eq!(m.generated_tokens_total.load(Ordering::Relaxed), 48);
    assert!(
        m.steps_total.load(Ordering::Relaxed) < 48,
        "sequences shared steps"
    );
}

#[test]
fn cancelled_sequence_stops_and_frees_its_blocks() {
    let (handle, tokenizer) = start(2);
    let prompt = tokenizer.encode("Tell me a long story", false).unwrap();
    let (rx, cancel) = submit(&handle, prompt.clone(), request(200));
    for _ in 0..3 {
        assert!(matches!(rx.recv().unwrap(), SequenceEvent::Token { .. }));
    }
    cancel.store(true, Ordering::SeqCst);
    // Nothing ends it but the cancellation: no Done arrives, the channel just closes.
    let mut extra = 0;
    while let Ok(event) = rx.recv() {
        assert!(
            matches!(event, SequenceEvent::Token { .. }),
            "a cancelled sequence sends no Done"
        );
        extra += 1;
    }
    assert!(
        extra < 5,
        "stopped within a step or two, not {extra} tokens later"
    );
    // The pool is whole again: a request needing all of one sequence's blocks runs.
    let (rx, _) = submit(&handle, prompt, request(8));
    assert_eq!(collect(&rx).0.len(), 8);
    assert_eq!(
        handle.metrics().requests_cancelled.load(Ordering::Relaxed),
        1
    );
}

#[test]
fn bad_requests_are_refused_at_submission() {
    let (handle, _) = start(1);
    let refuse = |prompt: Vec<u32>| {
        handle.submit(SubmitRequest {
            prompt,
            generation: request(4),
            sink: Box::new(|_| true),
            cancel: Arc::new(AtomicBool::new(false)),
        })
    };
    assert!(matches!(refuse(vec![]), Err(SubmitError::EmptyPrompt)));
    assert!(matches!(
        refuse(vec![1; 300]),
        Err(SubmitError::PromptTooLong {
            prompt: 300,
            ctx_size: 256
        })
    ));
    assert!(matches!(
        refuse(vec![5, 99_999]),
        Err(SubmitError::TokenOutOfRange { id: 99_999, .. })
    ));
}

#[test]
fn queue_limit_counts_waiting_requests() {
    // One place in the batch, one in the queue: a third request is refused while the first
    // runs and the second waits, even though the scheduler thread keeps draining its channel.
    let path = fixture(MODEL);
    let tokenizer = Tokenizer::from_model_dir(&path).unwrap();
    let handle = scheduler::spawn(
        move || {
            let dir = ModelDir::open(&path)?;
            Engine::load(&dir, CpuBackend::new(), &options(1), &mut |_, _, _| {})
        },
        tokenizer.clone(),
        SchedulerConfig { max_queue: 1 },
    )
    .unwrap();
    let prompt = tokenizer.encode("Tell me a long story", false).unwrap();
    let (running, cancel_running) = submit(&handle, prompt.clone(), request(200));
    assert!(matches!(
        running.recv().unwrap(),
        SequenceEvent::Token { .. }
    ));
    let (waiting, cancel_waiting) = submit(&handle, prompt.clone(), request(4));
    let refused = handle.submit(SubmitRequest {
        prompt: prompt.clone(),
        generation: request(4),
        sink: Box::new(|_| true),
        cancel: Arc::new(AtomicBool::new(false)),
    });
    assert!(matches!(refused, Err(SubmitError::QueueFull(1))));
    assert_eq!(handle.metrics().queue_depth.load(Ordering::Relaxed), 1);
    cancel_running.store(true, Ordering::SeqCst);
    cancel_waiting.store(true, Ordering::SeqCst);
    while running.recv().is_ok() {}
    while waiting.recv().is_ok() {}
    // The count drops just after the cancelled request is dropped.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while handle.metrics().queue_depth.load(Ordering::Relaxed) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the queue never emptied"
        );
        std::thread::yield_now();
    }
    // Once the queue has emptied, requests are taken again.
    let (rx, _) = submit(&handle, prompt, request(3));
    assert_eq!(collect(&rx).0.len(), 3);
    assert!(handle.is_running());
    handle.shutdown();
    assert!(!handle.is_running());
}

#[test]
fn a_failing_sequence_does_not_affect_the_others() {
    let (handle, tokenizer) = start(2);
    let prompt = tokenizer.encode("It was the best of times", false).unwrap();
    // Every token banned: sampling this sequence fails at its first token.
    let mut banned = request(6);
    banned.sampling.logit_bias = (0..handle.info().vocab_size as u32)
        .map(|t| (t, f32::NEG_INFINITY))
        .collect();
    let (good, _) = submit(&handle, prompt.clone(), request(6));
    let (bad, _) = submit(&handle, prompt.clone(), banned);
    match bad.recv().unwrap() {
        SequenceEvent::Failed(message) => assert!(message.contains("finite"), "{message}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    let (tokens, _, finish) = collect(&good);
    assert_eq!(tokens.len(), 6);
    assert_eq!(finish, FinishReason::Length);
    // The same prompt alone gives the same tokens.
    let (again, _) = submit(&handle, prompt, request(6));
    assert_eq!(collect(&again).0, tokens);
    assert_eq!(handle.metrics().requests_failed.load(Ordering::Relaxed), 1);
}
