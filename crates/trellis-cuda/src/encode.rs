//! The quantizer's Viterbi search on the GPU (`kernels/viterbi.cu`): [`CudaTileSearch`] finds
//! exactly the walks of the CPU's exact search (`trellis_codec::encode::encode_tile`), so a
//! conversion with `--device cuda` writes the same bytes as `--effort exact` on the CPU.

use crate::device::{Args, Device, Grid, cuda_error};
use crate::memory::{DeviceMem, Growable};
use std::sync::Mutex;
use trellis_backend::Result;
use trellis_codec::bits::STATE_BITS;
use trellis_codec::encode::{EncodedTile, MAX_TARGET, TileSearch, targets_in_position_order};
use trellis_codec::{BitWidth, Codebook, TILE_WEIGHTS};

/// Threads of one search block (`VITERBI_THREADS` in the kernel).
const THREADS: u32 = 512;

/// Tiles per launch at most: bounds the host and device buffers of one launch (the caller's
/// batch is split into launches of this size).
const MAX_TILES_PER_LAUNCH: usize = 1 << 16;

/// The GPU's tile search: one device, its buffers reused across calls (grown on demand).
pub struct CudaTileSearch {
    dev: Device,
    buffers: Mutex<Buffers>,
}

/// Device buffers of the search, kept between calls.
struct Buffers {
    /// The codebook as fp16 bits, per codebook (uploaded on first use).
    tables: Vec<(Codebook, DeviceMem<u16>)>,
    /// The shifts of the 256 positions for the width of the last call.
    shifts: Option<(BitWidth, DeviceMem<u8>)>,
    targets: Growable<f32>,
    states: Growable<u16>,
    back: Growable<u32>,
    staged: Growable<f32>,
}

/// Survivor costs a block stages in global memory in steps of at most two code bits
/// (`viterbi_step` in the kernel), which have too many survivors per thread for registers.
const STAGED_COSTS: usize = 1 << 15;

/// Shapes of one width's search: backpointer words per pass and survivor costs.
struct SearchShape {
    shifts: [u8; TILE_WEIGHTS],
    back_words: usize,
    /// Survivor costs of the widest step (held in shared memory).
    cost_len: usize,
    /// Whether some step stages its costs in global memory.
    staged: bool,
}

impl SearchShape {
    fn of(bits: BitWidth) -> SearchShape {
        let mut shifts = [0u8; TILE_WEIGHTS];
        for (t, s) in shifts.iter_mut().enumerate() {
            *s = u8::try_from(bits.code_bits(t)).expect("a code is at most 8 bits");
        }
        // A step writes `dn` planes of one bit per survivor, 2^(16 − dn) survivors; the sum is
        // the same for both passes (they visit the same positions).
        let back_words = (0..TILE_WEIGHTS)
            .map(|t| {
                let dn = bits.code_bits(t);
                dn as usize * ((1usize << (STATE_BITS - dn)) / 32)
            })
            .sum();
        let min_shift = (0..TILE_WEIGHTS)
            .map(|t| bits.code_bits(t))
            .min()
            .expect("256 positions");
        SearchShape {
            shifts,
            back_words,
            cost_len: 1usize << (STATE_BITS - min_shift),
            staged: min_shift <= 2,
        }
    }
}

impl CudaTileSearch {
    /// Open GPU `device_index` and compile (or load) the kernels.
    pub fn new(device_index: usize) -> Result<CudaTileSearch> {
        let dev = Device::open(device_index)?;
        Ok(CudaTileSearch {
            dev,
            buffers: Mutex::new(Buffers {
                tables: Vec::new(),
                shifts: None,
                targets: Growable::new("tile targets"),
                states: Growable::new("tile walks"),
                back: Growable::new("Viterbi backpointers"),
                staged: Growable::new("Viterbi staged costs"),
            }),
        })
    }

    /// Blocks that run at once with `shared_bytes` of dynamic shared memory each.
    fn resident_blocks(&self, shared_bytes: usize) -> Result<usize> {
        let kernel = &self.dev.kernels.viterbi_tiles;
        let per_sm = kernel
            .func
            .occupancy_max_active_blocks_per_multiprocessor(THREADS, shared_bytes, None)
            .map_err(|e| cuda_error(format!("occupancy of {}: {e}", kernel.name)))?;
        Ok(self.dev.sm_count * (per_sm as usize).max(1))
    }

    /// The walks of `targets` (position order, 256 per tile) into `states`.
    fn search(
        &self,
        position_targets: &[f32],
        bits: BitWidth,
        codebook: Codebook,
        states: &mut [u16],
    ) -> Result<()> {
        // Callers may come from any thread; the context must be current for the occupancy
        // query and the allocations.
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| cuda_error(format!("binding the context: {e}")))?;
        let tiles = position_targets.len() / TILE_WEIGHTS;
        let shape = SearchShape::of(bits);
        let shared_bytes = shape.cost_len * std::mem::size_of::<f32>();
        let blocks = tiles.min(self.resident_blocks(shared_bytes)?);

        let mut guard = self.buffers.lock().expect("tile search buffers");
        let buffers = &mut *guard;
        let dev = &self.dev;
        if !buffers.tables.iter().any(|(c, _)| *c == codebook) {
            let bits: Vec<u16> = codebook.table().iter().map(|v| v.to_bits()).collect();
            let table = DeviceMem::from_host(dev, &bits, "codebook table")?;
            buffers.tables.push((codebook, table));
        }
        let table = buffers
            .tables
            .iter()
            .find(|(c, _)| *c == codebook)
            .map(|(_, t)| t.ptr)
            .expect("uploaded above");
        if buffers.shifts.as_ref().is_none_or(|(b, _)| *b != bits) {
            let mem = DeviceMem::from_host(dev, &shape.shifts, "trellis shifts")?;
            buffers.shifts = Some((bits, mem));
        }
        let shifts = buffers.shifts.as_ref().expect("uploaded above").1.ptr;
        let targets = buffers.targets.try_ensure(dev, tiles * TILE_WEIGHTS)?;
        targets.write(dev, position_targets);
        let targets = targets.ptr;
        let states_ptr = buffers.states.try_ensure(dev, tiles * TILE_WEIGHTS)?.ptr;
        let back = buffers.back.try_ensure(dev, blocks * shape.back_words)?.ptr;
        // Widths without short steps never touch the staging area.
        let staged = if shape.staged {
            buffers.staged.try_ensure(dev, blocks * STAGED_COSTS)?.ptr
        } else {
            0
        };

        let mut args = Args::new();
        args.arg(targets)
            .arg(shifts)
            .arg(table)
            .arg(back)
            .arg(shape.back_words as u64)
            .arg(staged)
            .arg(states_ptr)
            .arg(u32::try_from(tiles).expect("tiles per launch fit u32"));
        dev.launch(
            &dev.kernels.viterbi_tiles,
            Grid::new((blocks, 1, 1), THREADS).shared(shared_bytes),
            &mut args,
        );
        buffers
            .states
            .get()
            .expect("allocated above")
            .read(dev, states);
        Ok(())
    }
}

impl TileSearch for CudaTileSearch {
    fn name(&self) -> String {
        format!("cuda ({})", self.dev.name)
    }

    fn preferred_batch(&self) -> usize {
        // Two blocks a multiprocessor run at once (one at K = 1); four waves of them.
        self.dev.sm_count * 8
    }

    fn encode_tiles(
        &self,
        targets: &[[f32; TILE_WEIGHTS]],
        bits: BitWidth,
        codebook: Codebook,
    ) -> std::result::Result<Vec<EncodedTile>, String> {
        if let Some(bad) = targets
            .iter()
            .flatten()
            .find(|v| v.is_nan() || v.abs() > MAX_TARGET)
        {
            return Err(format!(
                "a target value of {bad} (the search needs finite values of magnitude ≤ {MAX_TARGET:e})"
            ));
        }
        let mut out = Vec::with_capacity(targets.len());
        for chunk in targets.chunks(MAX_TILES_PER_LAUNCH) {
            let position_targets = targets_in_position_order(chunk);
            let mut states = vec![0u16; chunk.len() * TILE_WEIGHTS];
            self.search(&position_targets, bits, codebook, &mut states)
                .map_err(|e| e.to_string())?;
            for (target, walk) in chunk.iter().zip(states.chunks_exact(TILE_WEIGHTS)) {
                let walk: [u16; TILE_WEIGHTS] = walk.try_into().expect("256 states");
                out.push(EncodedTile::from_walk(walk, target, bits, codebook));
            }
        }
        Ok(out)
    }
}
