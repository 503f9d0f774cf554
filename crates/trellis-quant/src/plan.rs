//! What gets quantized, per architecture: every decoder layer's linears with the input group
//! (Hessian) each belongs to, the output head, and the tensors kept dense — the router,
//! norms, embeddings and MLA's `kv_b_proj`, as ExLlamaV3 does.

use crate::capture::CaptureTag;
use std::collections::HashMap;
use trellis_format::{ModelConfig, TensorStore};

/// What a linear does, for bit allocation priorities and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Attention,
    Mlp,
    SharedExpert,
    Expert,
    Head,
}

/// One linear to quantize.
#[derive(Clone, Debug)]
pub struct LinearPlan {
    /// The module name, e.g. `model.layers.3.self_attn.q_proj` (tensors `{name}.weight`, …).
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    /// Input group within its layer: linears of one group share a Hessian.
    pub group: usize,
    /// This linear's input is what the group records (one member per group).
    pub captures: bool,
    pub role: Role,
}

impl LinearPlan {
    pub fn weights(&self) -> usize {
        self.in_features * self.out_features
    }
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct LayerPlan {
    pub index: usize,
    /// Tensor name prefix of the layer, e.g. `model.layers.3.` (with the dot).
    pub prefix: String,
    pub linears: Vec<LinearPlan>,
    /// Dense tensors converted to fp16 in the output (the router, `kv_b_proj`), as ExLlamaV3.
    pub fp16_tensors: Vec<String>,
}

impl LayerPlan {
    /// Capture tags for [`crate::capture::CaptureBackend::set_tags`], and each group's width.
    pub fn capture_tags(&self) -> (HashMap<String, CaptureTag>, Vec<(usize, usize)>) {
        let mut tags = HashMap::new();
        let mut widths: Vec<(usize, usize)> = Vec::new();
        for l in &self.linears {
            tags.insert(
                l.name.clone(),
                CaptureTag {
                    group: l.group,
                    capture: l.captures,
                    ends_layer: l.role != Role::Attention && l.name.ends_with("down_proj"),
                },
            );
            if !widths.iter().any(|&(g, _)| g == l.group) {
                widths.push((l.group, l.in_features));
            }
        }
        (tags, widths)
    }

    /// The linears of each group, in group order.
    pub fn groups(&self) -> Vec<(usize, Vec<&LinearPlan>)> {
        let mut groups: Vec<(usize, Vec<&LinearPlan>)> = Vec::new();
        for l in &self.linears {
            match groups.iter_mut().find(|(g, _)| *g == l.group) {
                Some((_, members)) => members.push(l),
                None => groups.push((l.group, vec![l])),
            }
        }
        groups
    }
}

/// The output head.
#[derive(Clone, Debug)]
pub struct HeadPlan {
    /// Module name of the head in the output (`lm_head`).
    pub name: String,
    /// Tensor holding its weight `[vocab, hidden]`: `lm_head.weight`, or the embedding table
    /// when the source ties them (the output then gets its own quantized head).
    pub source_tensor: String,
    pub tied: bool,
    pub in_features: usize,
    pub out_features: usize,
}

/// The whole model.
#[derive(Clone, Debug)]
pub struct ModelPlan {
    pub layers: Vec<LayerPlan>,
    pub head: HeadPlan,
}

impl ModelPlan {
    /// Every budgeted (non-head) linear, in layer order.
    pub fn budgeted(&self) -> impl Iterator<Item = (usize, &LinearPlan)> {
        self.layers
            .iter()
            .flat_map(|l| l.linears.iter().map(move |lin| (l.index, lin)))
    }
}

/// Assigns group ids within one layer.
struct LayerBuilder {
    linears: Vec<LinearPlan>,
    next_group: usize,
}

impl LayerBuilder {
    fn new() -> Self {
        LayerBuilder {
            linears: Vec::new(),
            next_group: 0,
        }
    }

    /// Linears sharing one input; the first member records it unless `recorded_by_experts`
    /// (the MoE block records its experts' shared input itself).
    fn group(&mut self, role: Role, members: &[(String, usize, usize)]) -> usize {
        let group = self.next_group;
        self.next_group += 1;
        for (i, (name, in_f, out_f)) in members.iter().enumerate() {
            self.linears.push(LinearPlan {
                name: name.clone(),
                in_features: *in_f,
                out_features: *out_f,
                group,
                captures: i == 0,
                role,
            });
        }
        group
    }

    /// Routed experts: gate/up of every expert share the MoE input (recorded at expert 0's
    /// gate, which the MoE block feeds) together with `shared_gate_up` (not recording); each
    /// expert's down projection has its own input.
    fn experts(
        &mut self,
        prefix: &str,
        count: usize,
        hidden: usize,
        inter: usize,
        shared_gate_up: &[(String, usize, usize)],
    ) {
        let input = self.next_group;
        self.next_group += 1;
        for e in 0..count {
            for (proj, captures) in [("gate_proj", e == 0), ("up_proj", false)] {
                self.linears.push(LinearPlan {
                    name: format!("{prefix}.experts.{e}.{proj}"),
                    in_features: hidden,
                    out_features: inter,
                    group: input,
                    captures,
                    role: Role::Expert,
                });
            }
        }
        for (name, in_f, out_f) in shared_gate_up {
            self.linears.push(LinearPlan {
                name: name.clone(),
                in_features: *in_f,
                out_features: *out_f,
                group: input,
                captures: false,
                role: Role::SharedExpert,
            });
        }
        for e in 0..count {
            self.group(
                Role::Expert,
                &[(format!("{prefix}.experts.{e}.down_proj"), inter, hidden)],
            );
        }
    }
}

/// Where Gemma 3 checkpoints keep the decoder (see the model's loader).
const GEMMA_PREFIXES: [&str; 3] = ["model.", "language_model.model.", "model.language_model."];

/// The plan for a model of `config` whose tensors are in `store`.
pub fn plan(config: &ModelConfig, store: &TensorStore) -> Result<ModelPlan, String> {
    let common = config.common();
    let mut layers = Vec::new();
    let prefix = match config {
        ModelConfig::Gemma3(_) => GEMMA_PREFIXES
            .into_iter()
            .find(|p| store.contains(&format!("{p}embed_tokens.weight")))
            .ok_or("no Gemma 3 embedding table found")?,
        _ => "model.",
    };
    let hidden = common.hidden_size;
    for l in 0..common.num_layers {
        let p = format!("{prefix}layers.{l}");
        let mut b = LayerBuilder::new();
        let mut fp16_tensors = Vec::new();
        let triple = |n: &str, i: usize, o: usize| (format!("{p}.{n}"), i, o);
        match config {
            ModelConfig::MlaMoe(c) => {
                let heads = c.num_attention_heads;
                let qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
                let kv_a = triple(
                    "self_attn.kv_a_proj_with_mqa",
                    hidden,
                    c.kv_lora_rank + c.qk_rope_head_dim,
                );
                match c.q_lora_rank {
                    Some(rank) => {
                        b.group(
                            Role::Attention,
                            &[triple("self_attn.q_a_proj", hidden, rank), kv_a],
                        );
                        b.group(
                            Role::Attention,
                            &[triple("self_attn.q_b_proj", rank, heads * qk)],
                        );
                    }
                    None => {
                        b.group(
                            Role::Attention,
                            &[triple("self_attn.q_proj", hidden, heads * qk), kv_a],
                        );
                    }
                }
                b.group(
                    Role::Attention,
                    &[triple("self_attn.o_proj", heads * c.v_head_dim, hidden)],
                );
                fp16_tensors.push(format!("{p}.self_attn.kv_b_proj.weight"));
                if c.is_moe_layer(l) {
                    let inter = c.moe_intermediate_size;
                    let shared_inter = inter * c.n_shared_experts;
                    let shared: Vec<(String, usize, usize)> = if c.n_shared_experts > 0 {
                        vec![
                            triple("mlp.shared_experts.gate_proj", hidden, shared_inter),
                            triple("mlp.shared_experts.up_proj", hidden, shared_inter),
                        ]
                    } else {
                        Vec::new()
                    };
                    b.experts(
                        &format!("{p}.mlp"),
                        c.n_routed_experts,
                        hidden,
                        inter,
                        &shared,
                    );
                    if c.n_shared_experts > 0 {
                        b.group(
                            Role::SharedExpert,
                            &[triple("mlp.shared_experts.down_proj", shared_inter, hidden)],
                        );
                    }
                    fp16_tensors.push(format!("{p}.mlp.gate.weight"));
                } else {
                    dense_mlp(&mut b, &p, hidden, c.intermediate_size);
                }
            }
            ModelConfig::Llama(c) => {
                attention(
                    &mut b,
                    &p,
                    hidden,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                );
                dense_mlp(&mut b, &p, hidden, c.intermediate_size);
            }
            ModelConfig::Qwen3Moe(c) => {
                attention(
                    &mut b,
                    &p,
                    hidden,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                );
                if c.is_moe_layer(l) {
                    b.experts(
                        &format!("{p}.mlp"),
                        c.num_experts,
                        hidden,
                        c.moe_intermediate_size,
                        &[],
                    );
                    fp16_tensors.push(format!("{p}.mlp.gate.weight"));
                } else {
                    dense_mlp(&mut b, &p, hidden, c.intermediate_size);
                }
            }
            ModelConfig::Gemma3(c) => {
                attention(
                    &mut b,
                    &p,
                    hidden,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                );
                dense_mlp(&mut b, &p, hidden, c.intermediate_size);
            }
        }
        layers.push(LayerPlan {
            index: l,
            prefix: format!("{p}."),
            linears: b.linears,
            fp16_tensors,
        });
    }
    let head_name = if prefix == "language_model.model." {
        "language_model.lm_head"
    } else {
        "lm_head"
    };
    let embed = format!("{prefix}embed_tokens.weight");
    let own_head = format!("{head_name}.weight");
    let (source_tensor, tied) = if store.contains(&own_head) {
        (own_head, false)
    } else if common.tie_word_embeddings {
        (embed, true)
    } else {
        return Err(format!(
            "no output head: `{own_head}` is missing and the config does not tie it to the embeddings"
        ));
    };
    Ok(ModelPlan {
        layers,
        head: HeadPlan {
            name: head_name.to_string(),
            source_tensor,
            tied,
            in_features: hidden,
            out_features: common.vocab_size,
        },
    })
}

fn attention(
    b: &mut LayerBuilder,
    p: &str,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) {
    let name = |n: &str| format!("{p}.self_attn.{n}");
    b.group(
        Role::Attention,
        &[
            (name("q_proj"), hidden, heads * head_dim),
            (name("k_proj"), hidden, kv_heads * head_dim),
            (name("v_proj"), hidden, kv_heads * head_dim),
        ],
    );
    b.group(
        Role::Attention,
        &[(name("o_proj"), heads * head_dim, hidden)],
    );
}

fn dense_mlp(b: &mut LayerBuilder, p: &str, hidden: usize, inter: usize) {
    let name = |n: &str| format!("{p}.mlp.{n}");
    b.group(
        Role::Mlp,
        &[
            (name("gate_proj"), hidden, inter),
            (name("up_proj"), hidden, inter),
        ],
    );
    b.group(Role::Mlp, &[(name("down_proj"), inter, hidden)]);
}
