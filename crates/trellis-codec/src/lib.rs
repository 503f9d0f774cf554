//! EXL3 trellis codec.
//!
//! Everything needed to turn the stored tensors of an EXL3 (QTIP-style bitshift trellis)
//! quantized linear into numbers and back, with no knowledge of files or models:
//!
//! * [`BitWidth`]: bits per weight, 1..8 and 1.5 / 2.5 / 3.5;
//! * [`Codebook`]: 3INST, mcg and mul1, bit-exact to the reference kernels;
//! * [`tile`]: the bitstream of one 16×16 tile, its states and the tensor-core position order;
//! * [`hadamard`]: the normalised 128-point Walsh–Hadamard transform;
//! * [`TrellisLinear`]: a whole layer with reference `decode_inner`, `reconstruct` and `apply`;
//! * [`encode`]: the Viterbi encoder that finds the best tail-biting walk for a target tile.

pub mod bits;
pub mod codebook;
pub mod encode;
pub mod hadamard;
pub mod linear;
pub mod tile;

pub use bits::{BitWidth, TILE_WEIGHTS};
pub use codebook::{CODEBOOK_SCALE, Codebook, MCG_MULTIPLIER, MUL1_MULTIPLIER};
pub use linear::{LinearShapeError, TrellisLinear};
