//! Rotary frequencies for each `rope_type`, computed the way transformers computes them
//! (f32 frequencies from an f32 power), so that positions rotate alike in both engines.

use trellis_backend::RopeSpec;
use trellis_format::{RopeConfig, RopeScaling};

/// YaRN's magnitude correction `0.1 · mscale · ln(scale) + 1` (1 when not stretching).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// `1 / θ^(2i/dim)` for i in 0..dim/2, in f32 as transformers does.
fn base_inv_freq(theta: f64, dim: usize) -> Vec<f32> {
    let base = theta as f32;
    (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// The rope of `dim` rotated dims per head under `config`, pairing dims as adjacent pairs
/// (`interleaved`) or halves.
pub fn rope_spec(config: &RopeConfig, dim: usize, interleaved: bool) -> RopeSpec {
    let mut inv_freq = base_inv_freq(config.theta, dim);
    let mut attention_scaling = 1.0f32;
    match &config.scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            for f in &mut inv_freq {
                *f /= *factor as f32;
            }
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
            );
            let old_context = *original_max_position_embeddings as f32;
            let low_freq_wavelen = old_context / low;
            let high_freq_wavelen = old_context / high;
            for f in &mut inv_freq {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_freq_wavelen {
                    // Long wavelengths are fully interpolated.
                    *f /= factor;
                } else if wavelen >= high_freq_wavelen {
                    // In between, blend interpolation and extrapolation smoothly.
                    let smooth = (old_context / wavelen - low) / (high - low);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            attention_factor,
        } => {
            let base = config.theta;
            let original = *original_max_position_embeddings as f64;
            let correction_dim = |rotations: f64| {
                (dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln())
                    / (2.0 * base.ln())
            };
            let low = correction_dim(*beta_fast).floor().max(0.0);
            let high = correction_dim(*beta_slow).ceil().min(dim as f64 - 1.0);
            let high = if low == high { high + 0.001 } else { high };
            for (i, f) in inv_freq.iter_mut().enumerate() {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
                let extrapolation_weight = 1.0 - ramp;
                let interpolated = *f / *factor as f32;
                *f = interpolated * (1.0 - extrapolation_weight) + *f * extrapolation_weight;
            }
            attention_scaling = match attention_factor {
                Some(a) => *a as f32,
                None if *mscale != 0.0 && *mscale_all_dim != 0.0 => {
                    (yarn_mscale(*factor, *mscale) / yarn_mscale(*factor, *mscale_all_dim)) as f32
                }
                None => yarn_mscale(*factor, 1.0) as f32,
            };
        }
    }
    RopeSpec {
        inv_freq,
        attention_scaling,
        interleaved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(scaling: RopeScaling) -> RopeConfig {
        RopeConfig {
            theta: 500000.0,
            scaling,
            partial_rotary_factor: 1.0,
        }
    }

    #[test]
    fn default_frequencies() {
        let r = rope_spec(&config(RopeScaling::None), 64, true);
        assert_eq!(r.dim(), 64);
        assert_eq!(r.inv_freq[0], 1.0);
        let want = 1.0 / 500000f64.powf(62.0 / 64.0);
        assert!((f64::from(r.inv_freq[31]) - want).abs() / want < 1e-5);
    }

    #[test]
    fn llama3_keeps_high_and_divides_low_frequencies() {
        let plain = rope_spec(&config(RopeScaling::None), 64, false);
        let scaled = rope_spec(
            &config(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 256,
            }),
            64,
            false,
        );
        // Wavelength 2π < 256/4: unchanged.
        assert_eq!(scaled.inv_freq[0], plain.inv_freq[0]);
        // Lowest frequency has wavelength far above 256: divided by the factor.
        assert!((scaled.inv_freq[31] - plain.inv_freq[31] / 8.0).abs() < 1e-12);
        // Monotone non-increasing, as the blend never reorders frequencies.
        assert!(scaled.inv_freq.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn yarn_attention_factor_cancels_with_equal_mscales() {
        let r = rope_spec(
            &config(RopeScaling::Yarn {
                factor: 40.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
                attention_factor: None,
            }),
            64,
            true,
        );
        assert_eq!(r.attention_scaling, 1.0);
        let plain = rope_spec(&config(RopeScaling::None), 64, true);
        assert_eq!(
            r.inv_freq[0], plain.inv_freq[0],
            "fastest frequency extrapolated"
        );
        assert!(
            (r.inv_freq[31] - plain.inv_freq[31] / 40.0).abs() < 1e-12,
            "slowest interpolated"
        );
    }
}
