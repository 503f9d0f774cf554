use anyhow::{Context, bail};
use std::path::PathBuf;
use trellis_format::{
    DType, LinearWeights, TensorSource, logical_linear_shape, write_safetensors_file,
};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    model: PathBuf,
    /// Key prefix of the linear layer, e.g. `model.layers.1.self_attn.kv_a_proj_with_mqa`.
    #[arg(long)]
    tensor: String,
    /// Output safetensors file; holds `<prefix>.weight` as f32 [out, in] (Hugging Face orientation).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = super::open_model(&args.model)?;
    let prefix = args.tensor.strip_suffix(".weight").unwrap_or(&args.tensor);
    let store = &dir.tensors;
    let weights = match logical_linear_shape(&dir.config, prefix) {
        Some((in_f, out_f)) => store.linear(prefix, in_f, out_f)?,
        None if store.contains(&format!("{prefix}.trellis")) => {
            LinearWeights::Trellis(store.trellis_linear_padded(prefix)?)
        }
        None if store.contains(&format!("{prefix}.weight")) => {
            let w = store.get(&format!("{prefix}.weight"))?;
            let [out_f, in_f] = w.shape[..] else {
                bail!("{prefix}.weight is not a matrix (shape {:?})", w.shape);
            };
            store.linear(prefix, in_f, out_f)?
        }
        None => bail!(
            "{}: no linear `{prefix}` (neither `{prefix}.trellis` nor `{prefix}.weight`)",
            args.model.display()
        ),
    };
    let (in_f, out_f) = (weights.in_features(), weights.out_features());
    // Reconstruct in EXL3 orientation (in × out), then transpose to HF's [out, in].
    let hf: Vec<f32> = match &weights {
        LinearWeights::Trellis(t) => {
            let w = t.reconstruct();
            let mut out = vec![0.0f32; in_f * out_f];
            for i in 0..in_f {
                for o in 0..out_f {
                    out[o * in_f + i] = w[i * out_f + o];
                }
            }
            out
        }
        LinearWeights::Dense { weight, .. } => weight.to_f32()?,
    };
    let bytes: Vec<u8> = hf.iter().flat_map(|v| v.to_le_bytes()).collect();
    let name = format!("{prefix}.weight");
    let source = TensorSource::from_bytes(name.clone(), DType::F32, vec![out_f, in_f], bytes);
    write_safetensors_file(&args.out, &[source])
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {name} f32 [{out_f}, {in_f}] to {}",
        args.out.display()
    );
    Ok(())
}
