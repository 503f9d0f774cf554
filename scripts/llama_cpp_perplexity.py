#!/usr/bin/env python3
"""Perplexity of a GGUF model under llama.cpp (through llama-cpp-python), scored exactly as
`trellis perplexity` scores: the text encoded without special tokens, cut into windows of
--ctx tokens whose first token becomes BOS, and the second half of each window scored.

    pip install llama-cpp-python numpy
    scripts/llama_cpp_perplexity.py model.gguf --text eval.txt --ctx 512
"""
import argparse
import json
import math
import time

import numpy as np
from llama_cpp import Llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--text", required=True)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    llm = Llama(model_path=args.gguf, n_ctx=args.ctx, n_batch=args.ctx, logits_all=True,
                n_threads=args.threads, verbose=False)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    windows = len(tokens) // args.ctx
    if windows == 0:
        raise SystemExit(f"{args.text}: {len(tokens)} tokens, fewer than one window")
    bos = llm.token_bos()
    first = args.ctx // 2
    nll, scored = 0.0, 0
    started = time.time()
    for w in range(windows):
        window = tokens[w * args.ctx:(w + 1) * args.ctx]
        window[0] = bos
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:args.ctx], dtype=np.float64)
        rows = logits[first:args.ctx - 1]
        top = rows.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
        targets = np.asarray(window[first + 1:args.ctx])
        nll += float((log_norm - rows[np.arange(len(targets)), targets]).sum())
        scored += len(targets)
    print(json.dumps({
        "engine": "llama.cpp (llama-cpp-python)",
        "text_tokens": len(tokens),
        "ctx": args.ctx,
        "windows": windows,
        "scored_tokens": scored,
        "perplexity": math.exp(nll / scored),
        "seconds": round(time.time() - started, 1),
    }))


if __name__ == "__main__":
    main()
