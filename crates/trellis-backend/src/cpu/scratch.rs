//! Per-thread scratch memory for ops, so that the per-token path allocates nothing once the
//! buffers have grown to the largest size a model asks for (the model warms them at load).
//!
//! Ops are called from one thread (the model's): outside the rayon pool, or the pool's worker
//! 0 when a command's thread joined it (`set_threads`). Only task scratch is used by tasks.
//!
//! Independent pools exist because scratch is held at three depths at once: a composite op
//! (MoE) holds layer scratch while it runs linears, a linear holds op scratch on the calling
//! thread, and rayon workers (possibly that same thread) use task scratch.

use std::cell::RefCell;

thread_local! {
    static LAYER_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static OP_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static TASK_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_pool<R>(
    pool: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    pool.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// Scratch for a composite op that calls other ops (MoE experts), on the calling thread.
pub fn with_layer_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_pool(&LAYER_SCRATCH, len, f)
}

/// Scratch for a whole op, used on the calling thread (contents are unspecified).
pub fn with_op_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_pool(&OP_SCRATCH, len, f)
}

/// Scratch for one parallel task; must not be held across a rayon call.
pub fn with_task_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_pool(&TASK_SCRATCH, len, f)
}
