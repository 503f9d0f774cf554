//! The normalised 128-point Sylvester (Walsh–Hadamard) transform used on both sides of every
//! EXL3 weight, applied block-diagonally to vectors whose length is a multiple of 128.

/// Hadamard block size of the EXL3 format.
pub const HADAMARD_SIZE: usize = 128;

/// 1/√128: the normalisation that makes the transform orthogonal (and its own inverse).
pub const HADAMARD_SCALE: f32 = 0.088_388_35;

/// Unnormalised fast Walsh–Hadamard transform of one 128-element block, in natural order:
/// `out[i] = Σ_j (−1)^popcount(i & j) · v[j]`.
#[inline]
pub fn fwht128_unnormalized(v: &mut [f32]) {
    debug_assert_eq!(v.len(), HADAMARD_SIZE);
    let mut h = 1;
    while h < HADAMARD_SIZE {
        for block in v.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (x, y) = (*a, *b);
                *a = x + y;
                *b = x - y;
            }
        }
        h *= 2;
    }
}

/// Normalised transform of every consecutive 128-element block of `v` (block-diagonal H̃).
///
/// Panics if the length is not a multiple of 128; callers pad first.
pub fn hadamard_blocks(v: &mut [f32]) {
    assert_eq!(
        v.len() % HADAMARD_SIZE,
        0,
        "Hadamard input must be a multiple of 128"
    );
    for block in v.chunks_exact_mut(HADAMARD_SIZE) {
        fwht128_unnormalized(block);
        for x in block.iter_mut() {
            *x *= HADAMARD_SCALE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense_hadamard(v: &[f32]) -> Vec<f32> {
        (0..HADAMARD_SIZE)
            .map(|i| {
                let s: f64 = (0..HADAMARD_SIZE)
                    .map(|j| {
                        let sign = if (i & j).count_ones() % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        };
                        sign * f64::from(v[j])
                    })
                    .sum();
                (s / (HADAMARD_SIZE as f64).sqrt()) as f32
            })
            .collect()
    }

    #[test]
    fn matches_the_dense_definition_and_is_an_involution() {
        let v: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut fast = v.clone();
        hadamard_blocks(&mut fast);
        for b in 0..2 {
            let want = dense_hadamard(&v[b * 128..(b + 1) * 128]);
            for (g, w) in fast[b * 128..(b + 1) * 128].iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{g} vs {w}");
            }
        }
        hadamard_blocks(&mut fast);
        for (g, w) in fast.iter().zip(&v) {
            assert!((g - w).abs() < 1e-4, "H·H ≠ I: {g} vs {w}");
        }
    }

    #[test]
    fn unit_vector_maps_to_constant() {
        let mut e0 = vec![0.0f32; 128];
        e0[0] = 1.0;
        hadamard_blocks(&mut e0);
        assert!(e0.iter().all(|&x| (x - HADAMARD_SCALE).abs() < 1e-7));
    }
}
