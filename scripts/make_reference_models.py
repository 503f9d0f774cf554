#!/usr/bin/env python3
"""Tiny random-init models of each supported architecture, built with transformers, and their
reference outputs — the float32 ground truth for trellis's model code.

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-reference.txt
    .venv/bin/python scripts/make_reference_models.py [family ...]

For each family this writes tests/fixtures/<family>-tiny/ with config.json and
model.safetensors (bf16 weights, as checkpoints ship), and reference.safetensors holding
`input_ids` [48] and the float32 `logits` [48, vocab] of one forward over them, computed with
the saved bf16 weights upcast to float32, eager attention, on the CPU. Everything is seeded;
rerunning reproduces the files.
"""

import json
import pathlib
import sys

import torch
import transformers
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
VOCAB = 320
SEQ = 48

# Small but non-degenerate: enough heads, experts and layers to exercise every code path.
FAMILIES = {
    # q_lora_rank null (direct q_proj), softmax routing limited to the best groups by their
    # maximum, no renormalisation, two shared experts, YaRN with DeepSeek-V2-Lite's mscales.
    "deepseek-v2": dict(
        cls="DeepseekV2ForCausalLM",
        config=dict(
            model_type="deepseek_v2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
            first_k_dense_replace=1, n_group=4, topk_group=2, topk_method="group_limited_greedy",
            routed_scaling_factor=1.5, norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                 original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                                 mscale=0.707, mscale_all_dim=0.707),
        ),
    ),
    # The DeepSeek-V3 router: sigmoid scores, selection bias, groups ranked by their top-2 sum,
    # renormalised weights; YaRN whose mscale sharpens the softmax.
    "deepseek-v3": dict(
        cls="DeepseekV3ForCausalLM",
        config=dict(
            model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
            first_k_dense_replace=1, n_group=4, topk_group=2, topk_method="noaux_tc",
            routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                 original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                                 mscale=1.0, mscale_all_dim=1.0),
        ),
    ),
    # GQA 4:1, Llama 3 rope scaling whose original context (64) puts one frequency in the blended
    # band, the others kept or divided; biases on every attention and MLP projection.
    "llama": dict(
        cls="LlamaForCausalLM",
        config=dict(
            model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            attention_bias=True, mlp_bias=True,
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64),
        ),
    ),
    # One KV head for four query heads, head_dim wider than hidden/heads, a sliding window far
    # shorter than the sequence on every layer, linear rope scaling.
    "mistral": dict(
        cls="MistralForCausalLM",
        config=dict(
            model_type="mistral", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
            sliding_window=12, max_position_embeddings=256, rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="linear", rope_theta=1000000.0, factor=2.0),
        ),
    ),
    # q/k/v biases, tied embeddings, the sliding window on layers ≥ max_window_layers, YaRN with
    # the attention factor derived from the scaling factor.
    "qwen2": dict(
        cls="Qwen2ForCausalLM",
        config=dict(
            model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            use_sliding_window=True, sliding_window=8, max_window_layers=1,
            max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters=dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0,
                                 original_max_position_embeddings=16),
        ),
    ),
    # Per-head q/k RMSNorm, head_dim 32 with hidden 64, tied embeddings, an explicit
    # `layer_types` that makes the first layer slide.
    "qwen3": dict(
        cls="Qwen3ForCausalLM",
        config=dict(
            model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            use_sliding_window=True, sliding_window=10,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
    # Softmax top-2 of 8 experts, renormalised; layer 1 forced dense by `mlp_only_layers`; YaRN
    # with an explicit attention factor.
    "qwen3-moe": dict(
        cls="Qwen3MoeForCausalLM",
        config=dict(
            model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[1], num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters=dict(rope_type="yarn", rope_theta=1000000.0, factor=2.0,
                                 original_max_position_embeddings=32, attention_factor=1.2),
        ),
    ),
    # Local (sliding, window 8, θ 10⁴) and global (θ 10⁶, linear scaling) layers alternating,
    # q/k norms, (1 + w) norms (initialised around 0 as Gemma's are), softmax scale from
    # query_pre_attn_scalar ≠ head_dim, final logit softcapping. attn_logit_softcapping is set
    # to show it is ignored: transformers does not apply it to Gemma 3 (q/k norms replaced it).
    "gemma3": dict(
        cls="Gemma3ForCausalLM",
        init=dict(norm_center=0.0, embed_std=0.125),
        config=dict(
            model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            query_pre_attn_scalar=24, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
            final_logit_softcapping=1.5, attn_logit_softcapping=2.0,
            rope_parameters=dict(
                full_attention=dict(rope_type="linear", rope_theta=1000000.0, factor=2.0),
                sliding_attention=dict(rope_type="default", rope_theta=10000.0),
            ),
        ),
    ),
}


def init_weights(model: torch.nn.Module, seed: int, norm_center: float = 1.0, embed_std: float = 1.0) -> None:
    """Every parameter ~ N(0, σ): large enough that logits are not flat, norms around 1
    (`norm_center` 0 for models whose norms multiply by 1 + w)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight") or "layernorm" in name:
            values = norm_center + 0.1 * torch.randn(p.shape, generator=g)
        elif "embed_tokens" in name:
            values = embed_std * torch.randn(p.shape, generator=g)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
            values = torch.randn(p.shape, generator=g) / fan_in**0.5
        with torch.no_grad():
            p.copy_(values)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            with torch.no_grad():
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def make(family: str, spec: dict, seed: int) -> None:
    out = ROOT / f"{family}-tiny"
    out.mkdir(parents=True, exist_ok=True)
    cls = getattr(transformers, spec["cls"])
    config = transformers.AutoConfig.for_model(**spec["config"])
    config.architectures = [spec["cls"]]
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    init_weights(model, seed, **spec.get("init", {}))
    # Store bf16 weights in the checkpoint layout (per-expert tensors), as published models
    # ship; the router bias stays float32.
    model.to(torch.bfloat16)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.data = b.data.float()
    model.save_pretrained(out)
    # The reference runs on exactly the stored weights, upcast.
    reloaded = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        logits = reloaded(ids[None]).logits[0].float()
    save_file({"input_ids": ids.to(torch.int64), "logits": logits.contiguous()}, out / "reference.safetensors",
              metadata={"torch": torch.__version__, "transformers": transformers.__version__, "seed": str(seed)})
    top2 = logits.topk(2, dim=-1).values
    print(f"{family}: {sum(p.numel() for p in model.parameters())} parameters, logits std {logits.std():.3f}, "
          f"min top-2 margin {(top2[:, 0] - top2[:, 1]).min():.4f}, distinct argmax {logits.argmax(-1).unique().numel()}")


def main() -> None:
    wanted = sys.argv[1:] or list(FAMILIES)
    for i, family in enumerate(FAMILIES):
        if family in wanted:
            make(family, FAMILIES[family], seed=1000 + i)


if __name__ == "__main__":
    main()
