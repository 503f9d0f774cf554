#!/usr/bin/env python3
"""llama.cpp side by side with `trellis bench` on full-size GLM-4.7-Flash shapes (CPU).

Run it with the interpreter of a venv that holds llama-cpp-python (and numpy), e.g.

    PY=/work/pyenv-llamacpp/bin/python
    $PY scripts/llama_cpp_glm_bench.py make-gguf --quant Q3_K --out /work/llama-bench/glm-q3_k.gguf
    $PY scripts/llama_cpp_glm_bench.py bench --model /work/llama-bench/glm-q3_k.gguf --threads 2 --json

`make-gguf` writes a `deepseek2` GGUF (llama.cpp's architecture for GLM-4.7-Flash) with all 47
layers at the real shapes (see shared/reference/glm-4.7-flash.md). Tensor types follow what
llama.cpp's quantizer produces for a "Q3_K"/"Q4_K" file: every weight matrix in that type,
`output.weight` in Q6_K, `attn_k_b` (rows of 192, not a multiple of 256) in the quantizer's
fallback type (Q4_0 resp. Q5_0), norms and the router in F32. That gives 13.02 GB (Q3_K) and
16.96 GB (Q4_K), the sizes of the files behind the llama.cpp figures in anchors.md, and
llama.cpp counts 29,943,393,920 parameters, the real model's count without the MTP layer.

The file is sparse, so it costs only ~0.2 GB of disk:

* All big quantized tensors (attention projections, routed and shared experts, the dense layer-0
  MLP, the output head) are holes: the writer seeks past them and the file is truncated to its
  full length. They read back as zero blocks. A k-quant block whose scale d is 0 runs through
  exactly the same ggml instructions as a random one: the dot products unpack and multiply every
  block without looking at its values, and the CPU matmul kernels never skip zero weights.
  (The one value-dependent shortcut: turning an all-zero activation row into Q8_K skips its
  rounding loop. Several activations are zero here, e.g. the inputs of o_proj and of the
  down projections, but that is O(K) work per row next to the O(N*K) product.) Reading a hole through llama.cpp's mmap still allocates a real, zero-filled
  page-cache page per 4 KiB (llama.cpp maps with MAP_POPULATE, so this happens at load), so the
  resident memory and the weight traffic per token are those of a real file of that size.
* The small tensors that decide the work pattern hold seeded random data: the token embedding
  (so hidden states are non-zero and differ per token), the router `ffn_gate_inp` and the score
  correction bias `exp_probs_b` (so sigmoid top-4 routing spreads tokens over all 64 experts
  like a real model). Norm weights are ones.
* With zero weights every layer's attention and MLP output is zero, so the residual stream of
  a token is its embedding row; the router then still sees a different input per token and per
  layer, which is all routing needs. The logits are all zero, so argmax always picks token 0:
  `bench` therefore computes the argmax each step (its cost is real, as in trellis) but feeds
  back a token from a seeded random stream, so decode steps route to varying experts as a real
  model's would (feeding 0 forever would hit the same 4 experts per layer every step).
* The tokenizer is llama.cpp's "none" model plus `deepseek2.vocab_size = 154880`, for which
  llama.cpp creates 154,880 dummy tokens: the cheapest metadata that makes every id of the real
  vocabulary valid. Nothing here tokenizes text.

`bench` mirrors `trellis bench`: one short warm-up (8 prompt tokens, up to 4 generated), then
--repeat runs from an empty KV cache, each prefilling a random prompt of --prompt-tokens ids in
one batch (the same ids as trellis's `random_prompt`, seed 0) and generating --gen-tokens tokens
greedily; the first token comes from the prefill, so prefill tok/s = prompt / (prefill + first
argmax) and decode tok/s = (gen - 1) / time of the remaining single-token steps. Figures are
medians. The batch and ubatch sizes, flash-attention setting and F16 KV cache default to
llama-bench's defaults, as the anchors were measured with llama-bench.

Reading the figures against anchors.md: llama-bench's tg128 decodes from an empty cache, this
decodes after the prompt (as trellis does), so expect decode slightly below tg128. Load time is
not that of a real file read cold from disk (holes need no I/O). The machine has ~24 GB of RAM:
run this and trellis one after the other, never together, or their 12-17 GB of weights evict
each other's pages and both slow down.

`side-by-side` does exactly that: per round, this script's `bench` in a child process (so
llama.cpp's memory is gone before trellis loads), then `trellis bench` with the same prompt
length, generated tokens, threads and repeats (once per `--trellis-variant`, e.g. plain and
with `--kv-b-int8`: `--trellis-variant= --trellis-variant=--kv-b-int8`). It keeps every
report as JSON under --out and prints one line per round and variant with both engines'
medians and trellis's ratios, then the medians over rounds:

    $PY scripts/llama_cpp_glm_bench.py side-by-side --gguf /work/llama-bench/glm-q4_k.gguf \
        --trellis target/release/trellis --model-dir /work/models/glm-synth-4bpw \
        --prompt-tokens 512 --gen-tokens 128 --rounds 2 --out /tmp/sbs
"""

import argparse
import ctypes
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import time

import numpy as np

# GLM-4.7-Flash (shared/reference/glm-4.7-flash.md, sections 2 and 3).
HIDDEN = 2048
LAYERS = 47
DENSE_FF = 10240
EXPERT_FF = 1536
EXPERTS = 64
EXPERTS_USED = 4
SHARED_EXPERTS = 1
HEADS = 20
Q_LORA = 768
KV_LORA = 512
ROPE_DIM = 64
NOPE_DIM = 192
V_HEAD = 256
VOCAB = 154880
CONTEXT = 202752
ROPE_THETA = 1.0e6
RMS_EPS = 1.0e-5
ROUTED_SCALE = 1.8

# ggml type: (id, weights per block, bytes per block), from ggml.h / ggml-common.h.
GGML_TYPES = {
    "F32": (0, 1, 4),
    "Q4_0": (2, 32, 18),
    "Q5_0": (6, 32, 22),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q6_K": (14, 256, 210),
}
# What llama.cpp's quantizer (tensor_type_fallback in src/llama-quant.cpp) turns a k-quant into
# when the row length is not a multiple of 256.
FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0"}
ALIGNMENT = 32  # GGUF default (no general.alignment key)

# llama.cpp as vendored in the llama-cpp-python sdist, from that sdist's CHANGELOG.md.
LLAMA_CPP_COMMIT = {"0.3.36": "0c1e57098"}

# GGUF metadata value types.
GGUF_UINT32, GGUF_FLOAT32, GGUF_BOOL, GGUF_STRING = 4, 6, 7, 8


# ---------------------------------------------------------------------------------------------
# make-gguf


def tensor_plan(quant, layers):
    """(name, dims with the fastest-varying first as GGUF stores them, ggml type, fill), in the
    order llama.cpp's converter writes them. fill: 'hole' (sparse zeros), 'ones', 'embed',
    'router' or 'bias'."""
    plan = [
        ("token_embd.weight", [HIDDEN, VOCAB], quant, "embed"),
        ("output_norm.weight", [HIDDEN], "F32", "ones"),
        ("output.weight", [HIDDEN, VOCAB], "Q6_K", "hole"),
    ]
    for i in range(layers):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", [HIDDEN], "F32", "ones"),
            (b + "attn_q_a_norm.weight", [Q_LORA], "F32", "ones"),
            (b + "attn_kv_a_norm.weight", [KV_LORA], "F32", "ones"),
            (b + "attn_q_a.weight", [HIDDEN, Q_LORA], quant, "hole"),
            (b + "attn_q_b.weight", [Q_LORA, HEADS * (NOPE_DIM + ROPE_DIM)], quant, "hole"),
            (b + "attn_kv_a_mqa.weight", [HIDDEN, KV_LORA + ROPE_DIM], quant, "hole"),
            # kv_b_proj split per head as the converter does for MLA (k_b transposed).
            (b + "attn_k_b.weight", [NOPE_DIM, KV_LORA, HEADS], FALLBACK[quant], "hole"),
            (b + "attn_v_b.weight", [KV_LORA, V_HEAD, HEADS], quant, "hole"),
            (b + "attn_output.weight", [HEADS * V_HEAD, HIDDEN], quant, "hole"),
            (b + "ffn_norm.weight", [HIDDEN], "F32", "ones"),
        ]
        if i == 0:  # leading dense block
            plan += [
                (b + "ffn_gate.weight", [HIDDEN, DENSE_FF], quant, "hole"),
                (b + "ffn_up.weight", [HIDDEN, DENSE_FF], quant, "hole"),
                (b + "ffn_down.weight", [DENSE_FF, HIDDEN], quant, "hole"),
            ]
        else:
            plan += [
                (b + "ffn_gate_inp.weight", [HIDDEN, EXPERTS], "F32", "router"),
                (b + "exp_probs_b.bias", [EXPERTS], "F32", "bias"),
                (b + "ffn_gate_exps.weight", [HIDDEN, EXPERT_FF, EXPERTS], quant, "hole"),
                (b + "ffn_up_exps.weight", [HIDDEN, EXPERT_FF, EXPERTS], quant, "hole"),
                (b + "ffn_down_exps.weight", [EXPERT_FF, HIDDEN, EXPERTS], quant, "hole"),
                (b + "ffn_gate_shexp.weight", [HIDDEN, EXPERT_FF * SHARED_EXPERTS], quant, "hole"),
                (b + "ffn_up_shexp.weight", [HIDDEN, EXPERT_FF * SHARED_EXPERTS], quant, "hole"),
                (b + "ffn_down_shexp.weight", [EXPERT_FF * SHARED_EXPERTS, HIDDEN], quant, "hole"),
            ]
    return plan


def metadata(layers):
    """The keys llama.cpp's deepseek2 loader reads (src/llama-model.cpp, src/models/deepseek2.cpp),
    with the values its converter writes for GLM-4.7-Flash."""
    a = "deepseek2."
    u32 = lambda v: (GGUF_UINT32, v)
    f32 = lambda v: (GGUF_FLOAT32, v)
    return [
        ("general.architecture", (GGUF_STRING, "deepseek2")),
        ("general.name", (GGUF_STRING, "GLM-4.7-Flash shapes, sparse random weights")),
        (a + "block_count", u32(layers)),
        (a + "context_length", u32(CONTEXT)),
        (a + "embedding_length", u32(HIDDEN)),
        (a + "feed_forward_length", u32(DENSE_FF)),
        (a + "attention.head_count", u32(HEADS)),
        # MLA runs as MQA over the latent: one KV head of 576 (key) / 512 (value) ...
        (a + "attention.head_count_kv", u32(1)),
        (a + "attention.key_length", u32(KV_LORA + ROPE_DIM)),
        (a + "attention.value_length", u32(KV_LORA)),
        # ... and the _mla lengths are the decompressed per-head sizes; their presence is what
        # makes llama.cpp treat the file as MLA with split attn_k_b / attn_v_b.
        (a + "attention.key_length_mla", u32(NOPE_DIM + ROPE_DIM)),
        (a + "attention.value_length_mla", u32(V_HEAD)),
        (a + "attention.q_lora_rank", u32(Q_LORA)),
        (a + "attention.kv_lora_rank", u32(KV_LORA)),
        (a + "attention.layer_norm_rms_epsilon", f32(RMS_EPS)),
        (a + "rope.freq_base", f32(ROPE_THETA)),
        (a + "rope.dimension_count", u32(ROPE_DIM)),
        (a + "vocab_size", u32(VOCAB)),
        (a + "leading_dense_block_count", u32(1)),
        (a + "expert_count", u32(EXPERTS)),
        (a + "expert_used_count", u32(EXPERTS_USED)),
        (a + "expert_shared_count", u32(SHARED_EXPERTS)),
        (a + "expert_feed_forward_length", u32(EXPERT_FF)),
        (a + "expert_group_count", u32(1)),
        (a + "expert_group_used_count", u32(1)),
        (a + "expert_weights_scale", f32(ROUTED_SCALE)),
        (a + "expert_weights_norm", (GGUF_BOOL, True)),
        (a + "expert_gating_func", u32(2)),  # LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
        ("tokenizer.ggml.model", (GGUF_STRING, "none")),
    ]


def gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gguf_value(kind, value):
    if kind == GGUF_UINT32:
        return struct.pack("<I", value)
    if kind == GGUF_FLOAT32:
        return struct.pack("<f", value)
    if kind == GGUF_BOOL:
        return struct.pack("<B", 1 if value else 0)
    if kind == GGUF_STRING:
        return gguf_string(value)
    raise ValueError(kind)


def tensor_bytes(dims, ggml_type):
    _, block, size = GGML_TYPES[ggml_type]
    if dims[0] % block:
        raise ValueError(f"row of {dims[0]} not a multiple of {ggml_type}'s block {block}")
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def align(n):
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def embedding_chunks(quant, rng, rows_per_chunk=8192):
    """Random blocks with a small finite super-block scale (random f16 bytes could be inf/NaN)."""
    _, block, size = GGML_TYPES[quant]
    blocks_per_row = HIDDEN // block
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for start in range(0, VOCAB, rows_per_chunk):
        rows = min(rows_per_chunk, VOCAB - start)
        blocks = rng.integers(0, 256, size=(rows * blocks_per_row, size), dtype=np.uint8)
        if quant == "Q3_K":  # d is the last field
            blocks[:, 108:110] = scale
        else:  # Q4_K: d and dmin lead the block
            blocks[:, 0:2] = scale
            blocks[:, 2:4] = scale
        yield blocks.tobytes()


def make_gguf(args):
    rng = np.random.default_rng(args.seed)
    plan = tensor_plan(args.quant, args.layers)
    kvs = metadata(args.layers)

    header = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(plan), len(kvs)))
    for key, (kind, value) in kvs:
        header += gguf_string(key) + struct.pack("<I", kind) + gguf_value(kind, value)
    offsets, offset = [], 0
    for name, dims, ggml_type, _ in plan:
        header += gguf_string(name) + struct.pack("<I", len(dims))
        header += struct.pack(f"<{len(dims)}Q", *dims)
        header += struct.pack("<IQ", GGML_TYPES[ggml_type][0], offset)
        offsets.append(offset)
        offset = align(offset + tensor_bytes(dims, ggml_type))
    data_start = align(len(header))
    total = data_start + offset

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:
        f.write(header)
        for (name, dims, ggml_type, fill), off in zip(plan, offsets):
            if fill == "hole":
                continue  # never written: stays a hole once the file is extended below
            f.seek(data_start + off)
            if fill == "embed":
                for chunk in embedding_chunks(ggml_type, rng):
                    f.write(chunk)
            elif fill == "ones":
                f.write(np.ones(dims, dtype=np.float32).tobytes())
            elif fill == "router":
                # Unit-RMS hidden states times N(0, 1/HIDDEN) weights give logits of unit
                # spread: sigmoid scores that differ clearly between experts.
                w = rng.standard_normal((dims[1], dims[0]), dtype=np.float32) / np.sqrt(HIDDEN)
                f.write(w.astype(np.float32).tobytes())
            elif fill == "bias":
                # Small next to the score spread, so it nudges selection without dominating.
                f.write((rng.standard_normal(dims[0], dtype=np.float32) * 0.01).tobytes())
        f.truncate(total)  # extends the file over the trailing holes without writing them

    st = os.stat(args.out)
    allocated = st.st_blocks * 512
    print(json.dumps({
        "out": args.out,
        "quant": args.quant,
        "layers": args.layers,
        "tensors": len(plan),
        "file_bytes": st.st_size,
        "allocated_bytes": allocated,
        "seed": args.seed,
    }, indent=2))


# ---------------------------------------------------------------------------------------------
# bench


def random_prompt(length, vocab, seed):
    """trellis_runtime::bench::random_prompt, bit for bit: same LCG, same ids."""
    mask = (1 << 64) - 1
    state = seed ^ 0x2545_F491_4F6C_DD1D
    out = []
    for _ in range(length):
        state = (state * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407) & mask
        out.append((state >> 33) % vocab)
    return out


def bench(args):
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(args.verbose)
    llama_cpp.llama_backend_init()

    needed = args.prompt_tokens + args.gen_tokens
    started = time.perf_counter()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mparams.use_extra_bufts = not args.no_repack  # llama-bench's --repack
    model = llama_cpp.llama_model_load_from_file(args.model.encode(), mparams)
    if not model:
        sys.exit(f"{args.model}: llama.cpp could not load the model (rerun with --verbose)")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = needed  # as llama-bench: prompt + generated tokens
    cparams.n_batch = args.n_batch
    cparams.n_ubatch = args.n_ubatch
    cparams.n_threads = args.threads
    cparams.n_threads_batch = args.threads
    cparams.flash_attn_type = {"auto": -1, "off": 0, "on": 1}[args.flash_attn]
    cparams.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        sys.exit("llama.cpp could not create a context (rerun with --verbose)")
    load_seconds = time.perf_counter() - started

    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    memory = llama_cpp.llama_get_memory(ctx)

    def decode(tokens):
        for i in range(0, len(tokens), args.n_batch):
            chunk = tokens[i:i + args.n_batch]
            ids = (llama_cpp.llama_token * len(chunk))(*chunk)
            rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ids, len(chunk)))
            if rc != 0:
                sys.exit(f"llama_decode returned {rc}")

    def argmax():
        # Reading the logits waits for the graph, so the timings below include all compute.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    def run(prompt, gen, feed):
        llama_cpp.llama_memory_clear(memory, True)
        t0 = time.perf_counter()
        decode(prompt)
        argmax()
        t1 = time.perf_counter()
        for step in range(gen - 1):
            decode([feed[step]])  # see the docstring: zero logits would always give token 0
            argmax()
        t2 = time.perf_counter()
        prefill_s, decode_s = t1 - t0, t2 - t1
        return {
            "prefill_tok_s": len(prompt) / prefill_s,
            "decode_tok_s": (gen - 1) / decode_s if gen > 1 else float("nan"),
            "ttft_ms": prefill_s * 1e3,
        }

    prompt = random_prompt(args.prompt_tokens, n_vocab, 0)
    feed = random_prompt(args.gen_tokens, n_vocab, 1)
    run(prompt[:8], min(args.gen_tokens, 4), feed)  # warm-up, as trellis bench
    runs = []
    for r in range(args.repeat):
        runs.append(run(prompt, args.gen_tokens, feed))
        if not args.json:
            print(f"run {r + 1}/{args.repeat}: {json.dumps(runs[-1])}", file=sys.stderr)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    desc = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(model, desc, len(desc))
    version = llama_cpp.__version__
    report = {
        "engine": "llama.cpp via llama-cpp-python",
        "llama_cpp_python": version,
        "llama_cpp_commit": LLAMA_CPP_COMMIT.get(version, "unknown"),
        "library": os.path.dirname(llama_cpp.__file__),
        # Compiled-in CPU features: AVX512/VNNI/BF16 here mean the build used -march=native.
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "build_flags": args.build_flags,
        "model": args.model,
        "model_desc": desc.value.decode(),
        "model_bytes": llama_cpp.llama_model_size(model),
        "model_params": llama_cpp.llama_model_n_params(model),
        "device": "cpu",
        "threads": args.threads,
        "repack": not args.no_repack,
        "n_batch": args.n_batch,
        "n_ubatch": args.n_ubatch,
        "flash_attn": args.flash_attn,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeat": args.repeat,
        "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs),
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
        "load_seconds": load_seconds,
        # Includes the mmapped (populated) weights, as llama-bench's and trellis's RSS do.
        "peak_rss_bytes": peak_rss,
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


# ---------------------------------------------------------------------------------------------
# side-by-side


def run_json(command):
    """Run a benchmark command and parse the JSON report it prints on stdout."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        sys.exit(f"{' '.join(command)} failed with exit code {done.returncode}:\n{tail}")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as e:
        sys.exit(f"{' '.join(command)} printed no JSON report ({e}):\n{done.stdout[-2000:]}")


def side_by_side(args):
    os.makedirs(args.out, exist_ok=True)
    common = ["--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
              "--threads", str(args.threads), "--repeat", str(args.repeat), "--json"]
    llama = [sys.executable, os.path.abspath(__file__), "bench", "--model", args.gguf] + common
    if args.no_repack:
        llama.append("--no-repack")
    variants = args.trellis_variant or [""]
    print(f"{args.prompt_tokens}-token prompt, {args.gen_tokens} generated, {args.threads} "
          f"threads, medians of {args.repeat} runs; llama.cpp "
          f"{'without' if args.no_repack else 'with'} weight repacking")
    print("round  llama.cpp prefill / decode   trellis prefill / decode   trellis / llama.cpp"
          "   trellis options")
    ratios = {v: [] for v in variants}
    for r in range(1, args.rounds + 1):
        theirs = run_json(llama)
        with open(os.path.join(args.out, f"llama-{r}.json"), "w") as f:
            json.dump(theirs, f, indent=2)
        for i, variant in enumerate(variants):
            ours = run_json([args.trellis, "bench", args.model_dir] + common + variant.split())
            name = f"trellis-{r}.json" if len(variants) == 1 else f"trellis-{i}-{r}.json"
            with open(os.path.join(args.out, name), "w") as f:
                json.dump(ours, f, indent=2)
            prefill = ours["prefill_tok_s"] / theirs["prefill_tok_s"]
            decode = ours["decode_tok_s"] / theirs["decode_tok_s"]
            ratios[variant].append((prefill, decode))
            print(f"{r:>5}  {theirs['prefill_tok_s']:>16.2f} / {theirs['decode_tok_s']:<7.2f}"
                  f"  {ours['prefill_tok_s']:>15.2f} / {ours['decode_tok_s']:<7.2f}"
                  f"  prefill {prefill:.2f}x, decode {decode:.2f}x   {variant or '(default)'}",
                  flush=True)
    for variant, rs in ratios.items():
        print(f"median ratio over {args.rounds} round(s), {variant or '(default)'}: prefill "
              f"{statistics.median(p for p, _ in rs):.2f}x, decode "
              f"{statistics.median(d for _, d in rs):.2f}x (reports in {args.out})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-gguf", help="write the sparse GLM-4.7-Flash-shaped deepseek2 GGUF")
    m.add_argument("--quant", choices=["Q3_K", "Q4_K"], required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--layers", type=int, default=LAYERS,
                   help="fewer layers for quick loader checks only; speeds need all 47")

    b = sub.add_parser("bench", help="prefill + decode speed under llama.cpp")
    b.add_argument("--model", required=True)
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--json", action="store_true",
                   help="print only the JSON report (it is printed either way)")
    b.add_argument("--n-batch", type=int, default=2048, help="llama-bench's default")
    b.add_argument("--n-ubatch", type=int, default=512, help="llama-bench's default")
    b.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto",
                   help="llama-bench's default is auto")
    b.add_argument("--no-repack", action="store_true",
                   help="llama-bench --repack 0: keep Q4_K in file layout (anchors' best prefill)")
    b.add_argument("--build-flags",
                   default="pip wheel of the llama-cpp-python 0.3.36 sdist: CMake Release, CPU "
                           "only, GGML_NATIVE=ON (default, -march=native), LLAMA_CURL=OFF",
                   help="how the llama.cpp library was built, copied into the report")
    b.add_argument("--verbose", action="store_true", help="show llama.cpp's log")

    c = sub.add_parser("side-by-side",
                       help="llama.cpp's bench and `trellis bench` in turn, with ratios")
    c.add_argument("--gguf", required=True, help="the GGUF for llama.cpp (make-gguf writes one)")
    c.add_argument("--trellis", default="trellis", help="the trellis binary")
    c.add_argument("--model-dir", required=True, help="the model directory for trellis")
    c.add_argument("--prompt-tokens", type=int, default=512)
    c.add_argument("--gen-tokens", type=int, default=128)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--repeat", type=int, default=2, help="runs per engine per round")
    c.add_argument("--rounds", type=int, default=2, help="alternations of the two engines")
    c.add_argument("--no-repack", action="store_true", help="passed to llama.cpp's bench")
    c.add_argument("--trellis-variant", action="append", metavar="OPTIONS",
                   help="extra `trellis bench` options, written with `=` (--trellis-variant=--kv-b-int8); "
                        "repeat to run several variants after each llama.cpp run (\"\" for none); "
                        "default: one plain run")
    c.add_argument("--out", required=True, help="directory for every JSON report")

    args = parser.parse_args()
    if args.command == "make-gguf":
        make_gguf(args)
    elif args.command == "side-by-side":
        if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.repeat < 1 or args.rounds < 1:
            parser.error("--prompt-tokens must be >= 1, --gen-tokens >= 2, --repeat and "
                         "--rounds >= 1")
        side_by_side(args)
    else:
        if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.repeat < 1:
            parser.error("--prompt-tokens must be >= 1, --gen-tokens >= 2 and --repeat >= 1")
        bench(args)


if __name__ == "__main__":
    main()
