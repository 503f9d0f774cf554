"""Does ExLlamaV3 accept trellis's EXL3 output? Loads EXL3 model directories in ExLlamaV3 (from its
package; its CUDA extension is compiled on first import, which takes minutes) and compares the
logits it computes with those trellis computed for the same tokens.

Usage (on a GPU machine with torch, after installing exllamav3 and its dependencies):

    python3 scripts/exllamav3_accept.py --tokens-from REF.safetensors \
        --case NAME MODEL_DIR TRELLIS_LOGITS.safetensors [--case ...] [--json OUT.json]

REF.safetensors holds `input_ids` (the fixtures' reference files do); each TRELLIS_LOGITS file
holds `logits` [tokens, vocab] from `trellis logits MODEL_DIR --tokens … --out FILE`. A case may
name a reference file instead (its `logits` tensor), e.g. the fixture's own ExLlamaV3 output, to
check this ExLlamaV3 against the one that made the fixtures. Prints, per case: relative L2 of the
logits, max |difference|, and how often both pick the same top-1 token.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens-from", required=True)
    p.add_argument("--case", nargs=3, action="append", metavar=("NAME", "MODEL", "LOGITS"))
    p.add_argument("--json")
    args = p.parse_args()

    import torch
    from safetensors.torch import load_file

    started = time.time()
    import exllamav3.ext  # noqa: F401  (compiles the extension on first use)
    from exllamav3 import Config, Model

    print(f"exllamav3 import (extension build included): {time.time() - started:.1f} s", flush=True)

    ids = load_file(args.tokens_from)["input_ids"].to(torch.long).view(1, -1)
    results = []
    for name, model_dir, logits_file in args.case or []:
        config = Config.from_directory(model_dir)
        model = Model.from_config(config)
        model.load("cuda:0")
        with torch.inference_mode():
            theirs = model.forward(ids.cuda(), {"attn_mode": "flash_attn_nc"})
        theirs = theirs[0].float().cpu()
        model.unload()
        ours = load_file(logits_file)["logits"].float()
        if ours.shape != theirs.shape:
            print(f"{name}: shape {tuple(ours.shape)} vs ExLlamaV3 {tuple(theirs.shape)}")
            return 1
        diff = ours - theirs
        rel_l2 = (diff.norm() / theirs.norm()).item()
        top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
        finite = bool(torch.isfinite(theirs).all())
        row = {
            "case": name,
            "tokens": ids.shape[1],
            "rel_l2": rel_l2,
            "max_abs_diff": diff.abs().max().item(),
            "top1_agreement": top1,
            "exllamav3_finite": finite,
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
