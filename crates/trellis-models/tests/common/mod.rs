//! A model on the CPU backend with a fresh f32 KV cache per run, fed in chunks.

use std::path::Path;
use trellis_backend::cpu::CpuBackend;
use trellis_backend::{Backend, Batch, KvDtype};
use trellis_format::ModelDir;
use trellis_models::{CausalLm, LoadOptions, Tap};
use trellis_testutil::TensorFile;

const BLOCK: usize = 16;
/// Most rows one pass (and its logits) may have.
const MAX_ROWS: usize = 128;

pub struct Harness {
    pub backend: CpuBackend,
    pub model: Box<dyn CausalLm<CpuBackend>>,
    pub vocab: usize,
}

impl Harness {
    pub fn load(dir: &Path) -> Harness {
        let model_dir = ModelDir::open(dir).expect("model dir opens");
        let backend = CpuBackend::new();
        let options = LoadOptions {
            max_rows: MAX_ROWS,
            max_logit_rows: MAX_ROWS,
        };
        let model = trellis_models::load(&model_dir, &backend, &options, &mut |_, _, _| {})
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let vocab = model.info().vocab_size;
        Harness {
            backend,
            model,
            vocab,
        }
    }

    /// Run `ids` from position 0 with a fresh cache: first a chunk of `first` tokens, then
    /// chunks of `rest`; returns the logits of every position, `[ids.len(), vocab]`.
    pub fn logits_in_chunks(&mut self, ids: &[u32], first: usize, rest: usize) -> Vec<f32> {
        self.logits_observed(ids, first, rest, None)
    }

    /// As [`Harness::logits_in_chunks`], showing every pass's taps to `observer`.
    pub fn logits_observed(
        &mut self,
        ids: &[u32],
        first: usize,
        rest: usize,
        mut observer: Option<&mut dyn FnMut(Tap<'_>)>,
    ) -> Vec<f32> {
        let n = ids.len();
        let layout = self
            .model
            .kv_layout(n.next_multiple_of(BLOCK), BLOCK, KvDtype::F32);
        let mut cache = self.backend.alloc_kv_cache(&layout).unwrap();
        let tables: Vec<u32> = (0..layout.num_blocks as u32).collect();
        let mut logits = vec![0.0; n * self.vocab];
        let mut start = 0;
        while start < n {
            let len = if start == 0 { first } else { rest }.min(n - start);
            let positions: Vec<u32> = (start as u32..(start + len) as u32).collect();
            let sequence = vec![0u32; len];
            let rows: Vec<u32> = (0..len as u32).collect();
            let batch = Batch {
                positions: &positions,
                sequence: &sequence,
                block_tables: &tables,
                blocks_per_sequence: layout.num_blocks,
                block_size: BLOCK,
            };
            self.model
                .forward(
                    &self.backend,
                    &ids[start..start + len],
                    &batch,
                    &mut cache,
                    &rows,
                    match observer.as_mut() {
                        Some(o) => Some(&mut **o),
                        None => None,
                    },
                )
                .unwrap();
            self.model.read_logits(
                &self.backend,
                &mut logits[start * self.vocab..(start + len) * self.vocab],
            );
            start += len;
        }
        logits
    }
}

pub fn ids(t: &TensorFile, name: &str) -> Vec<u32> {
    t.i64(name).data.iter().map(|&v| v as u32).collect()
}
