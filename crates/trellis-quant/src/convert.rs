//! The conversion driver: Hugging Face directory in, EXL3 directory out, one decoder layer at
//! a time.
//!
//! ```text
//! hidden = embed(calibration rows)
//! for each layer:
//!     load the dense layer; run hidden through it, recording xᵀx per input group
//!     quantize the layer's linears (LDLQ against those Hessians)
//!     write the layer's checkpoint; load it back; hidden = quantized layer(hidden)
//! head: H from final_norm(hidden); quantize lm_head
//! assemble model.safetensors (or shards + index), config.json, quantization_config.json
//! ```
//!
//! So every layer is calibrated on activations that went through the already-quantized
//! prefix, and memory holds one layer's weights, its Hessians and the calibration activations.
//! Everything is written under `<out>.partial/`, renamed to `<out>` at the very end; each
//! finished layer leaves a checkpoint there (its tensors, the activations after it and a state
//! file), from which `resume` continues.

use crate::alloc::{allocate, average_bits};
use crate::capture::CaptureBackend;
use crate::hessian::{Hessian, HessianAccumulator};
use crate::plan::{LayerPlan, LinearPlan, ModelPlan, Role, plan};
use crate::quantize::{
    DenseLinear, LinearSettings, OutScales, QuantizedLinear, Search, quantize_group,
};
use crate::{QuantError, Result};
use half::f16;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use trellis_backend::{Backend, Batch};
use trellis_codec::encode::Effort;
use trellis_codec::{BitWidth, Codebook};
use trellis_format::{
    DType, ModelDir, TensorSource, TensorStore, write_json, write_safetensors,
    write_safetensors_file,
};
use trellis_models::{LoadOptions, load_layerwise};

/// The version written into `quantization_config.version`.
pub const QUANTIZER_VERSION: &str = concat!("trellis-", env!("CARGO_PKG_VERSION"));

/// Head bits that mean "keep the head dense" (ExLlamaV3 1.6.5's convention).
pub const DENSE_HEAD_BITS: f64 = 16.0;

/// How to convert.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    /// Target average bits per weight over the decoder's linears.
    pub bits: f64,
    /// Bits of the output head; [`DENSE_HEAD_BITS`] keeps it dense.
    pub head_bits: f64,
    pub codebook: Codebook,
    pub out_scales: OutScales,
    /// Seed of every random sign flip.
    pub seed: u64,
    /// Largest safetensors shard of the output.
    pub max_shard_bytes: u64,
    /// Where and how thoroughly the Viterbi searches. On the CPU, `Effort::Fast` (default)
    /// about halves the conversion's encoding time; `Effort::Exact` gives identical output on
    /// every machine and ~1 % lower proxy error (on the tiny GLM fixture a KL difference within
    /// the seed-to-seed spread). A device search finds the exact walks.
    pub search: Search,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            bits: 4.0,
            head_bits: 6.0,
            codebook: Codebook::Mul1,
            out_scales: OutScales::Auto,
            seed: 0x007E_1115,
            max_shard_bytes: 8 << 30,
            search: Search::Cpu(Effort::Fast),
        }
    }
}

/// What to do when the output (or an interrupted run's work directory) exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overwrite {
    /// Refuse if the output exists; start afresh otherwise (discarding stale work).
    Refuse,
    /// Continue the interrupted run in `<out>.partial` (or start one); an existing complete
    /// output is left alone.
    Resume,
    /// Delete the output and any work, then start afresh.
    Force,
}

/// Progress of a conversion, for front ends.
#[derive(Clone, Debug)]
pub enum Event<'a> {
    /// Conversion planned: layers and the bit widths chosen.
    Planned {
        layers: usize,
        linears: usize,
        average_bits: f64,
        resumed_at: usize,
    },
    /// A stage of a layer (`layer == layers` is the head) begins; `tiles` is the tile count of
    /// its quantization, the unit of the progress bar.
    LayerStart {
        layer: usize,
        layers: usize,
        tiles: usize,
    },
    /// Something in the current layer happened (calibration pass, writing, …).
    Stage {
        layer: usize,
        what: &'a str,
    },
    /// One linear is done; `tiles` of its quantization are behind it.
    Tensor {
        layer: usize,
        name: &'a str,
        bits: BitWidth,
        tiles: usize,
        report: &'a crate::quantize::LinearReport,
    },
    LayerDone {
        layer: usize,
        seconds: f64,
    },
    /// Assembling the output.
    Writing,
}

/// The outcome of a conversion.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub output: PathBuf,
    pub average_bits: f64,
    pub head_bits: f64,
    pub tensors: Vec<TensorSummary>,
    pub seconds: f64,
}

/// One quantized linear in the summary.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TensorSummary {
    pub name: String,
    pub bits: f64,
    pub proxy_error: Option<f64>,
    pub weight_error: f64,
    pub fallback: bool,
}

/// The state file of a run in progress: which settings it belongs to and how far it got.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct RunState {
    /// Everything that decides the output; a resume with different settings is refused.
    settings: Value,
    /// Decoder layers written and whose output activations are saved.
    layers_done: usize,
    /// Per quantized linear so far.
    tensors: Vec<TensorSummary>,
}

const STATE_FILE: &str = "quantize-state.json";
const ACTIVATIONS_FILE: &str = "activations.f32";
const CHECKPOINT_DIR: &str = "checkpoint";

/// Files of a source directory never copied into the output.
fn skipped_source_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name == "model.safetensors.index.json"
        || name == "config.json"
        || name == "quantization_config.json"
        || [".bin", ".pt", ".pth", ".ckpt", ".gguf"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> QuantError + '_ {
    move |source| QuantError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write a file through a temporary name and rename it into place, so that a file under its
/// final name is always complete.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut tmp_name = path.file_name().expect("a file path").to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// `values` as little-endian f32 bytes, converted in slices (the calibration activations are
/// hundreds of megabytes: no second copy of them).
fn write_f32_le(path: &Path, values: &[f32]) -> Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut out = std::io::BufWriter::new(file);
    let mut bytes = Vec::with_capacity(1 << 20);
    for slice in values.chunks(1 << 18) {
        bytes.clear();
        for v in slice {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        out.write_all(&bytes).map_err(io_err(path))?;
    }
    out.flush().map_err(io_err(path))
}

/// Write safetensors through a temporary name.
pub fn write_safetensors_atomically(path: &Path, tensors: &[TensorSource]) -> Result<()> {
    write_atomically(path, |tmp| {
        write_safetensors_file(tmp, tensors).map_err(|e| QuantError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    })
}

/// The work directory of an output: `<out>.partial`.
pub fn work_dir_of(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "out".into());
    name.push(".partial");
    out.with_file_name(name)
}

/// Calibration token rows, all of one length.
#[derive(Clone, Debug)]
pub struct Calibration {
    pub rows: Vec<Vec<u32>>,
}

impl Calibration {
    /// Cut `tokens` into `rows` rows of `cols`; an error names what is missing.
    pub fn from_tokens(tokens: &[u32], rows: usize, cols: usize) -> Result<Calibration> {
        if rows == 0 || cols < 16 {
            return Err(QuantError::Calibration(format!(
                "{rows} rows × {cols} tokens: need at least one row of at least 16 tokens"
            )));
        }
        if tokens.len() < rows * cols {
            return Err(QuantError::Calibration(format!(
                "the calibration text has {} tokens, fewer than the {rows} rows × {cols} tokens \
                 asked for; give a longer text or fewer/shorter rows \
                 (--calibration-rows/--calibration-cols)",
                tokens.len()
            )));
        }
        Ok(Calibration {
            rows: tokens[..rows * cols]
                .chunks_exact(cols)
                .map(<[u32]>::to_vec)
                .collect(),
        })
    }

    /// The reference's mix: most rows cut from `tokens` (the calibration text), and the rest
    /// uniformly random ids below `vocab` (seeded), so that the Hessians also cover tokens the
    /// text never uses. How many are random: see [`random_row_count`].
    pub fn mixed(tokens: &[u32], rows: usize, cols: usize, vocab: usize) -> Result<Calibration> {
        let random_rows = random_row_count(rows);
        let mut cal = Calibration::from_tokens(tokens, rows - random_rows, cols)?;
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0xCA11B);
        for _ in 0..random_rows {
            cal.rows.push(
                (0..cols)
                    .map(|_| rand::Rng::random_range(&mut rng, 0..vocab.max(1) as u32))
                    .collect(),
            );
        }
        Ok(cal)
    }

    pub fn cols(&self) -> usize {
        self.rows.first().map_or(0, Vec::len)
    }

    /// A short fingerprint of the tokens (FNV-1a), to refuse resuming with other data.
    fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &t in self.rows.iter().flatten() {
            for b in t.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }
}

/// Weights of the reference's text sources (web, code, multilingual, technical, wiki,
/// stories) out of a total of 135; the remaining 20 are uniform random tokens.
const TEXT_SOURCE_WEIGHTS: [usize; 6] = [20, 20, 10, 10, 50, 5];

/// Random rows of a calibration set of `rows` rows, as ExLlamaV3 ends up with them: each text
/// source gets `max(1, ⌊weight/135 · rows⌋)` rows and the random source everything left, so
/// the rounding-down of six sources lands on the random rows (13 of 64, not 20/135 · 64 ≈ 9).
/// The layer-0 Hessians are built from these rows' embeddings: the random share decides how
/// well rare tokens' embedding directions are covered. Sets of fewer than 8 rows get none.
pub fn random_row_count(rows: usize) -> usize {
    let text: usize = TEXT_SOURCE_WEIGHTS
        .iter()
        .map(|&w| (w * rows / 135).max(1))
        .sum();
    rows.saturating_sub(text)
}

/// Seed of a tensor's sign flips: the run's seed mixed with the tensor name.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The tensors of a quantized linear, named `{name}.trellis` etc.
fn linear_tensors(name: &str, q: &QuantizedLinear) -> Vec<TensorSource> {
    let mut out = vec![
        TensorSource::from_bytes(
            format!("{name}.trellis"),
            DType::I16,
            vec![q.k_padded() / 16, q.n_padded() / 16, q.bits.tile_words()],
            q.trellis.iter().flat_map(|w| w.to_le_bytes()).collect(),
        ),
        TensorSource::from_bytes(
            format!("{name}.suh"),
            DType::F16,
            vec![q.k_padded()],
            q.suh.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        TensorSource::from_bytes(
            format!("{name}.svh"),
            DType::F16,
            vec![q.n_padded()],
            q.svh.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    ];
    if let Some(marker) = trellis_format::quant::marker_value(q.codebook) {
        out.push(TensorSource::from_bytes(
            format!("{name}.{}", q.codebook.name()),
            DType::I32,
            vec![],
            (marker as i32).to_le_bytes().to_vec(),
        ));
    }
    if let Some(bias) = &q.bias {
        out.push(TensorSource::from_bytes(
            format!("{name}.bias"),
            DType::F16,
            vec![bias.len()],
            bias.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    out
}

/// A dense tensor copied from `store`, as stored or converted to fp16.
fn dense_tensor(store: &TensorStore, name: &str, to_f16: bool) -> Result<TensorSource> {
    let view = store.get(name)?;
    let shape = view.shape.to_vec();
    if to_f16 && view.dtype != DType::F16 {
        let bytes: Vec<u8> = view
            .to_f32()?
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        return Ok(TensorSource::from_bytes(name, DType::F16, shape, bytes));
    }
    Ok(TensorSource::from_bytes(
        name,
        view.dtype,
        shape,
        view.bytes.to_vec(),
    ))
}

/// Run a converted layer's calibration rows through the layerwise model (one row per forward
/// pass, each row its own sequence from position 0).
struct Runner {
    backend: CaptureBackend,
    model: Box<dyn trellis_models::Layerwise<CaptureBackend>>,
    cache: trellis_backend::cpu::CpuKvCache,
    positions: Vec<u32>,
    sequence: Vec<u32>,
    block_table: Vec<u32>,
    block_size: usize,
    hidden: usize,
}

impl Runner {
    fn new(dir: &ModelDir, cols: usize) -> Result<Runner> {
        let backend = CaptureBackend::new();
        let model = load_layerwise(
            dir,
            &backend,
            &LoadOptions {
                max_rows: cols,
                max_logit_rows: 1,
            },
        )?;
        let block_size = 16;
        let layout = model.layer_kv_layout(cols, block_size);
        let cache = backend.alloc_kv_cache(&layout)?;
        let blocks = layout.num_blocks;
        let hidden = model.info().hidden_size;
        Ok(Runner {
            backend,
            model,
            cache,
            positions: (0..cols as u32).collect(),
            sequence: vec![0; cols],
            block_table: (0..blocks as u32).collect(),
            block_size,
            hidden,
        })
    }

    /// `states ← layer(states)` row by row.
    fn forward_all(&mut self, states: &mut [f32], cols: usize) -> Result<()> {
        for row in states.chunks_exact_mut(cols * self.hidden) {
            let batch = Batch {
                positions: &self.positions,
                sequence: &self.sequence,
                block_tables: &self.block_table,
                blocks_per_sequence: self.block_table.len(),
                block_size: self.block_size,
            };
            self.model
                .forward_layer(&self.backend, row, &batch, &mut self.cache)?;
        }
        Ok(())
    }
}

/// Convert the Hugging Face model in `source` to EXL3 in `out`.
pub fn quantize_model(
    source: &Path,
    out: &Path,
    calibration: &Calibration,
    options: &QuantizeOptions,
    overwrite: Overwrite,
    events: &mut dyn FnMut(Event<'_>),
) -> Result<Summary> {
    let start = Instant::now();
    let dir = ModelDir::open(source)?;
    if dir.quantization.is_some() || dir.tensors.names().any(|n| n.ends_with(".trellis")) {
        return Err(QuantError::AlreadyQuantized(source.to_path_buf()));
    }
    let common = dir.config.common();
    let cols = calibration.cols();
    if calibration.rows.is_empty() || calibration.rows.iter().any(|r| r.len() != cols) {
        return Err(QuantError::Calibration(
            "calibration rows must be non-empty and of one length".into(),
        ));
    }
    if let Some(bad) = calibration
        .rows
        .iter()
        .flatten()
        .find(|&&t| t as usize >= common.vocab_size)
    {
        return Err(QuantError::Calibration(format!(
            "token id {bad} is outside the vocabulary of {} tokens",
            common.vocab_size
        )));
    }
    let head_dense = options.head_bits >= DENSE_HEAD_BITS;
    let head_width = if head_dense {
        None
    } else {
        Some(
            BitWidth::from_f64(options.head_bits)
                .filter(|w| w.is_integer() || options.codebook == Codebook::Mul1)
                .ok_or_else(|| {
                    QuantError::Options(format!(
                        "--head-bits {}: expected 1..8 (1.5/2.5/3.5 with mul1) or 16 for a dense head",
                        options.head_bits
                    ))
                })?,
        )
    };
    let plan = plan(&dir.config, &dir.tensors)
        .map_err(|e| QuantError::Unsupported(format!("{}: {e}", source.display())))?;
    let widths = allocate(&plan, options.bits, options.codebook).map_err(QuantError::Options)?;
    let width_of: HashMap<&str, BitWidth> = plan
        .budgeted()
        .zip(&widths)
        .map(|((_, l), &w)| (l.name.as_str(), w))
        .collect();

    // Output and work directories.
    let work = work_dir_of(out);
    if out.exists() {
        match overwrite {
            Overwrite::Refuse => return Err(QuantError::OutputExists(out.to_path_buf())),
            Overwrite::Resume => return Err(QuantError::AlreadyComplete(out.to_path_buf())),
            Overwrite::Force => std::fs::remove_dir_all(out).map_err(io_err(out))?,
        }
    }
    if work.exists() && overwrite != Overwrite::Resume {
        std::fs::remove_dir_all(&work).map_err(io_err(&work))?;
    }
    let checkpoints = work.join(CHECKPOINT_DIR);
    std::fs::create_dir_all(&checkpoints).map_err(io_err(&checkpoints))?;

    let settings = json!({
        "source": source.canonicalize().unwrap_or_else(|_| source.to_path_buf()),
        "bits": options.bits,
        "head_bits": options.head_bits,
        "codebook": options.codebook.name(),
        "out_scales": options.out_scales.name(),
        "seed": options.seed,
        "calibration": {
            "rows": calibration.rows.len(),
            "cols": cols,
            "fingerprint": calibration.fingerprint(),
        },
        "quantizer": QUANTIZER_VERSION,
    });
    let state_path = work.join(STATE_FILE);
    let activations_path = work.join(ACTIVATIONS_FILE);
    let mut state = RunState {
        settings: settings.clone(),
        layers_done: 0,
        tensors: Vec::new(),
    };
    if overwrite == Overwrite::Resume && state_path.is_file() {
        let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
        let saved: RunState = serde_json::from_str(&text).map_err(|e| {
            QuantError::Resume(format!("{}: unreadable ({e})", state_path.display()))
        })?;
        if saved.settings != settings {
            return Err(QuantError::Resume(format!(
                "{} was started with other settings ({}); rerun with them, or with --force to start over",
                work.display(),
                saved.settings
            )));
        }
        state = saved;
    }

    events(Event::Planned {
        layers: plan.layers.len(),
        linears: widths.len(),
        average_bits: average_bits(&plan, &widths),
        resumed_at: state.layers_done,
    });

    let mut runner = Runner::new(&dir, cols)?;
    let hidden = common.hidden_size;
    let row_values = cols * hidden;
    let mut states = vec![0.0f32; calibration.rows.len() * row_values];
    if state.layers_done > 0 {
        let bytes = std::fs::read(&activations_path).map_err(io_err(&activations_path))?;
        if bytes.len() != states.len() * 4 {
            return Err(QuantError::Resume(format!(
                "{}: {} bytes, expected {}",
                activations_path.display(),
                bytes.len(),
                states.len() * 4
            )));
        }
        for (v, b) in states.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    } else {
        for (tokens, row) in calibration
            .rows
            .iter()
            .zip(states.chunks_exact_mut(row_values))
        {
            runner.model.embed(&runner.backend, tokens, row)?;
        }
    }

    for layer in &plan.layers[state.layers_done..] {
        let layer_start = Instant::now();
        let tiles: usize = layer.linears.iter().map(tiles_of).sum();
        events(Event::LayerStart {
            layer: layer.index,
            layers: plan.layers.len(),
            tiles,
        });
        // 1. Hessians from the dense layer, on the quantized prefix's activations.
        events(Event::Stage {
            layer: layer.index,
            what: "calibrating",
        });
        let (tags, group_widths) = layer.capture_tags();
        runner.backend.set_tags(tags, &group_widths);
        runner
            .model
            .load_layer(&runner.backend, &dir.tensors, layer.index)?;
        runner.backend.set_capturing(true);
        let mut scratch = states.clone();
        runner.forward_all(&mut scratch, cols)?;
        drop(scratch);
        runner.backend.set_capturing(false);
        let mut hessians: HashMap<usize, Hessian> = HashMap::new();
        for (group, acc) in runner.backend.take_accumulators() {
            if let Some(h) = acc.finish() {
                hessians.insert(group, h);
            }
        }

        // 2. Quantize, group by group.
        let mut tensors: Vec<TensorSource> = Vec::new();
        for (group, members) in layer.groups() {
            let dense: Vec<DenseLinear> = members
                .iter()
                .map(|m| read_dense(&dir.tensors, m))
                .collect::<Result<_>>()?;
            let jobs: Vec<(&DenseLinear, LinearSettings)> = dense
                .iter()
                .zip(&members)
                .map(|(d, m)| {
                    (
                        d,
                        LinearSettings {
                            bits: width_of[m.name.as_str()],
                            codebook: options.codebook,
                            seed: tensor_seed(options.seed, &m.name),
                            out_scales: options.out_scales,
                            search: options.search.clone(),
                        },
                    )
                })
                .collect();
            let quantized = quantize_group(&jobs, hessians.get(&group))?;
            for (m, q) in members.iter().zip(&quantized) {
                events(Event::Tensor {
                    layer: layer.index,
                    name: &m.name,
                    bits: q.bits,
                    tiles: tiles_of(m),
                    report: &q.report,
                });
                state.tensors.push(TensorSummary {
                    name: m.name.clone(),
                    bits: q.bits.as_f64(),
                    proxy_error: q.report.proxy_error,
                    weight_error: q.report.weight_error,
                    fallback: q.report.fallback,
                });
                tensors.extend(linear_tensors(&m.name, q));
            }
        }
        // 3. The layer's other tensors: norms as stored, router and kv_b in fp16.
        tensors.extend(kept_layer_tensors(&dir.tensors, layer)?);

        // 4. Checkpoint, then run the quantized layer to get the next layer's inputs.
        events(Event::Stage {
            layer: layer.index,
            what: "writing checkpoint",
        });
        let checkpoint = checkpoints.join(format!("layer-{:05}.safetensors", layer.index));
        write_safetensors_atomically(&checkpoint, &tensors)?;
        drop(tensors);
        events(Event::Stage {
            layer: layer.index,
            what: "running quantized layer",
        });
        let stored = TensorStore::open(&checkpoint)?;
        runner.backend.set_dense_trellis(true);
        let loaded = runner
            .model
            .load_layer(&runner.backend, &stored, layer.index);
        runner.backend.set_dense_trellis(false);
        loaded?;
        runner.forward_all(&mut states, cols)?;
        write_atomically(&activations_path, |tmp| write_f32_le(tmp, &states))?;
        state.layers_done = layer.index + 1;
        write_atomically(&state_path, |tmp| {
            let text = serde_json::to_string_pretty(&state).expect("state serializes");
            std::fs::write(tmp, text).map_err(io_err(tmp))
        })?;
        dir.tensors.release_mapped_pages();
        events(Event::LayerDone {
            layer: layer.index,
            seconds: layer_start.elapsed().as_secs_f64(),
        });
    }

    // The head, on the final norm of the quantized model's activations.
    let head_file = checkpoints.join("head.safetensors");
    if let Some(bits) = head_width.filter(|_| !head_file.is_file()) {
        let head = &plan.head;
        let head_plan = LinearPlan {
            name: head.name.clone(),
            in_features: head.in_features,
            out_features: head.out_features,
            group: 0,
            captures: true,
            role: Role::Head,
        };
        let layer = plan.layers.len();
        events(Event::LayerStart {
            layer,
            layers: layer,
            tiles: tiles_of(&head_plan),
        });
        events(Event::Stage {
            layer,
            what: "calibrating head",
        });
        let mut acc = HessianAccumulator::new(hidden);
        let mut normed = vec![0.0f32; row_values];
        for row in states.chunks_exact(row_values) {
            runner.model.final_norm(&runner.backend, row, &mut normed)?;
            acc.add(&normed, cols);
        }
        let hessian = acc.finish();
        let view = dir.tensors.get(&head.source_tensor)?;
        let dense = DenseLinear::from_hf(&view.to_f32()?, head.in_features, head.out_features);
        let settings = LinearSettings {
            bits,
            codebook: options.codebook,
            seed: tensor_seed(options.seed, &head.name),
            out_scales: options.out_scales,
            search: options.search.clone(),
        };
        let q = quantize_group(&[(&dense, settings)], hessian.as_ref())?
            .pop()
            .expect("one member");
        events(Event::Tensor {
            layer,
            name: &head.name,
            bits,
            tiles: tiles_of(&head_plan),
            report: &q.report,
        });
        state.tensors.push(TensorSummary {
            name: head.name.clone(),
            bits: bits.as_f64(),
            proxy_error: q.report.proxy_error,
            weight_error: q.report.weight_error,
            fallback: q.report.fallback,
        });
        write_safetensors_atomically(&head_file, &linear_tensors(&head.name, &q))?;
        write_atomically(&state_path, |tmp| {
            let text = serde_json::to_string_pretty(&state).expect("state serializes");
            std::fs::write(tmp, text).map_err(io_err(tmp))
        })?;
    }
    drop(runner);
    drop(states);

    events(Event::Writing);
    let average = average_bits(&plan, &widths);
    assemble(
        &dir,
        &plan,
        &work,
        &checkpoints,
        options,
        head_width,
        calibration,
        average,
        &width_of,
    )?;
    // The checkpoint is no longer needed; the output becomes visible under its name last.
    std::fs::remove_dir_all(&checkpoints).map_err(io_err(&checkpoints))?;
    for f in [&state_path, &activations_path] {
        if f.exists() {
            std::fs::remove_file(f).map_err(io_err(f))?;
        }
    }
    std::fs::rename(&work, out).map_err(io_err(out))?;
    Ok(Summary {
        output: out.to_path_buf(),
        average_bits: average,
        head_bits: options.head_bits,
        tensors: state.tensors,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Tiles of a linear (its padded size / 256): the unit of quantization work.
fn tiles_of(l: &LinearPlan) -> usize {
    l.in_features.div_ceil(128) * 128 * l.out_features.div_ceil(128) * 128 / 256
}

/// A linear's dense weight (and bias) from the source, in EXL3 orientation.
fn read_dense(store: &TensorStore, l: &LinearPlan) -> Result<DenseLinear> {
    let view = store.expect(
        &format!("{}.weight", l.name),
        &[DType::F32, DType::F16, DType::BF16],
        &[l.out_features, l.in_features],
    )?;
    let mut dense = DenseLinear::from_hf(&view.to_f32()?, l.in_features, l.out_features);
    if let Some(bias) = store.try_get(&format!("{}.bias", l.name)) {
        bias.check(&[DType::F32, DType::F16, DType::BF16], &[l.out_features])?;
        dense.bias = Some(bias.to_f32()?);
    }
    Ok(dense)
}

/// Every tensor of a layer that is not a quantized linear's weight or bias.
fn kept_layer_tensors(store: &TensorStore, layer: &LayerPlan) -> Result<Vec<TensorSource>> {
    let quantized: HashSet<String> = layer
        .linears
        .iter()
        .flat_map(|l| [format!("{}.weight", l.name), format!("{}.bias", l.name)])
        .collect();
    let mut out = Vec::new();
    for name in store.names() {
        if !name.starts_with(&layer.prefix) || quantized.contains(name) {
            continue;
        }
        let to_f16 = layer.fp16_tensors.iter().any(|t| t == name);
        out.push(dense_tensor(store, name, to_f16)?);
    }
    Ok(out)
}

/// Torch's name of a dtype, as `quantization_config.json` records it.
fn torch_dtype(dtype: DType) -> String {
    let name = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::I16 => "int16",
        DType::I32 => "int32",
        DType::I64 => "int64",
        DType::U8 => "uint8",
        DType::I8 => "int8",
        DType::Bool => "bool",
        DType::U16 => "uint16",
        DType::U32 => "uint32",
        DType::U64 => "uint64",
        DType::F8E4M3 => "float8_e4m3fn",
        DType::F8E5M2 => "float8_e5m2",
        DType::F8E8M0 => "float8_e8m0fnu",
    };
    format!("torch.{name}")
}

/// Write the output directory's files into `work`.
#[allow(clippy::too_many_arguments)]
fn assemble(
    dir: &ModelDir,
    plan: &ModelPlan,
    work: &Path,
    checkpoints: &Path,
    options: &QuantizeOptions,
    head_width: Option<BitWidth>,
    calibration: &Calibration,
    average: f64,
    width_of: &HashMap<&str, BitWidth>,
) -> Result<()> {
    // Tensor sources that read from the checkpoints and the source lazily, in layer order.
    let mut stores: Vec<Arc<TensorStore>> = Vec::new();
    for layer in &plan.layers {
        let path = checkpoints.join(format!("layer-{:05}.safetensors", layer.index));
        stores.push(Arc::new(TensorStore::open(&path)?));
    }
    let head_store = match head_width {
        Some(_) => Some(Arc::new(TensorStore::open(
            &checkpoints.join("head.safetensors"),
        )?)),
        None => None,
    };
    let source = Arc::new(TensorStore::open(&dir.path)?);
    let layer_prefixes: Vec<&str> = plan.layers.iter().map(|l| l.prefix.as_str()).collect();
    let mut tensors: Vec<TensorSource> = Vec::new();
    let lazy = |store: &Arc<TensorStore>, name: &str| -> Result<TensorSource> {
        let view = store.get(name)?;
        let (dtype, shape) = (view.dtype, view.shape.to_vec());
        let store = Arc::clone(store);
        let owned = name.to_string();
        Ok(TensorSource::new(
            name,
            dtype,
            shape,
            Box::new(move || {
                store
                    .get(&owned)
                    .expect("a tensor listed at assembly")
                    .bytes
                    .to_vec()
            }),
        ))
    };
    // Source tensors outside the decoder layers (embeddings, final norm, anything the
    // quantizer does not know), except a head that is replaced by a quantized one.
    let head_weight = format!("{}.weight", plan.head.name);
    let mut source_names: Vec<&str> = source
        .names()
        .filter(|n| !layer_prefixes.iter().any(|p| n.starts_with(p)))
        .filter(|n| head_width.is_none() || *n != head_weight)
        .collect();
    source_names.sort();
    for name in source_names {
        tensors.push(lazy(&source, name)?);
    }
    for store in &stores {
        for name in store.names() {
            tensors.push(lazy(store, name)?);
        }
    }
    if let Some(store) = &head_store {
        for name in store.names() {
            tensors.push(lazy(store, name)?);
        }
    }
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    write_safetensors(
        work,
        &tensors,
        options.max_shard_bytes,
        Some(metadata),
        &mut |_| {},
    )
    .map_err(|e| QuantError::Write {
        path: work.to_path_buf(),
        message: e.to_string(),
    })?;

    // quantization_config (config.json) and its tensor_storage index.
    let mut quant = json!({
        "quant_method": "exl3",
        "version": QUANTIZER_VERSION,
        "bits": (average * 100.0).round() / 100.0,
        "head_bits": if head_width.is_some() { json!(options.head_bits) } else { json!(16) },
        "calibration": {"rows": calibration.rows.len(), "cols": calibration.cols()},
        "out_scales": options.out_scales.name(),
        "codebook": options.codebook.name(),
    });
    if let Some(original) = dir.raw_config.get("quantization_config") {
        quant["original_quantization_config"] = original.clone();
    }
    let mut storage: BTreeMap<String, Value> = BTreeMap::new();
    for t in &tensors {
        let (module, _) = t.name.rsplit_once('.').unwrap_or((t.name.as_str(), ""));
        let entry = storage
            .entry(module.to_string())
            .or_insert_with(|| json!({"stored_tensors": {}}));
        entry["stored_tensors"][&t.name] = json!({
            "shape": t.shape,
            "n_bytes": t.byte_len(),
            "dtype": torch_dtype(t.dtype),
        });
        if t.name.ends_with(".trellis") {
            let bits = if module == plan.head.name {
                head_width.expect("a quantized head").as_f64()
            } else {
                width_of[module].as_f64()
            };
            entry["quant_format"] = json!("exl3");
            entry["bits_per_weight"] = if bits.fract() == 0.0 {
                json!(bits as u64)
            } else {
                json!(bits)
            };
            match options.codebook {
                Codebook::Mul1 => entry["mul1_multiplier"] = json!(trellis_codec::MUL1_MULTIPLIER),
                Codebook::Mcg => entry["mcg_multiplier"] = json!(trellis_codec::MCG_MULTIPLIER),
                Codebook::Inst3 => {}
            }
        }
    }
    let mut config = dir.raw_config.clone();
    config["quantization_config"] = quant.clone();
    if head_width.is_some() && plan.head.tied {
        // The output has its own quantized head (as ExLlamaV3 writes it).
        config["tie_word_embeddings"] = json!(false);
        if let Some(text) = config.get_mut("text_config").filter(|t| t.is_object()) {
            text["tie_word_embeddings"] = json!(false);
        }
    }
    let config_path = work.join("config.json");
    write_json(&config_path, &config).map_err(|e| QuantError::Write {
        path: config_path.clone(),
        message: e.to_string(),
    })?;
    quant["tensor_storage"] = json!(storage);
    let index_path = work.join("quantization_config.json");
    write_json(&index_path, &quant).map_err(|e| QuantError::Write {
        path: index_path.clone(),
        message: e.to_string(),
    })?;

    // Tokenizer, chat template, generation config and other non-weight files, verbatim.
    let listing = std::fs::read_dir(&dir.path).map_err(io_err(&dir.path))?;
    for item in listing {
        let item = item.map_err(io_err(&dir.path))?;
        let path = item.path();
        let name = item.file_name().to_string_lossy().into_owned();
        if !path.is_file() || skipped_source_file(&name) {
            continue;
        }
        let dst = work.join(&name);
        std::fs::copy(&path, &dst).map_err(io_err(&dst))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The random share follows the reference's per-source rounding: 13 of the default 64 rows
    /// (not round(64·20/135) = 9), 8 of 32, 39 of ExLlamaV3's own default of 250.
    #[test]
    fn random_rows_match_the_reference_mix() {
        assert_eq!(random_row_count(64), 13);
        assert_eq!(random_row_count(32), 8);
        assert_eq!(random_row_count(250), 39);
        assert_eq!(random_row_count(135), 20);
        for rows in 0..=7 {
            assert_eq!(random_row_count(rows), 0, "{rows} rows");
        }
        for rows in 8..400 {
            let r = random_row_count(rows);
            assert!(
                r >= 1 && 10 * r <= 31 * rows / 10,
                "{rows} rows: {r} random"
            );
        }
    }

    /// `mixed` cuts the text rows first, then appends the random rows: ids below `vocab`,
    /// spread over the vocabulary the text never reaches.
    #[test]
    fn mixed_calibration_layout() {
        let vocab = 4096;
        let text: Vec<u32> = (0..64 * 128).map(|i| (i % 50) as u32).collect();
        let cal = Calibration::mixed(&text, 64, 128, vocab).unwrap();
        assert_eq!(cal.rows.len(), 64);
        assert!(cal.rows.iter().all(|r| r.len() == 128));
        let (text_rows, random_rows) = cal.rows.split_at(64 - 13);
        assert!(text_rows.iter().flatten().all(|&t| t < 50));
        assert!(random_rows.iter().flatten().all(|&t| (t as usize) < vocab));
        let distinct: HashSet<u32> = random_rows.iter().flatten().copied().collect();
        // 13 × 128 uniform draws from 4096 ids hit about 1395 distinct ones.
        assert!(distinct.len() > 1200, "{} distinct", distinct.len());
        // The text must still supply its rows.
        assert!(Calibration::mixed(&text[..40 * 128], 64, 128, vocab).is_err());
    }
}
