#!/usr/bin/env python3
"""Check a `trellis import` result against independent readers of the same GGUF file.

    .venv/bin/pip install -r scripts/requirements-gguf-check.txt
    trellis import model.gguf --out model-hf --dtype f32
    .venv/bin/python scripts/check_gguf_import.py model.gguf model-hf

1. Tokenizer: the imported tokenizer.json (through `tokenizers`) against transformers' own
   GGUF tokenizer and, when llama-cpp-python is installed, llama.cpp's tokenizer, on a fixed
   multi-language text set plus seeded random strings. Prints how many encodings agree.
2. Weights: the imported directory loaded with transformers against transformers' own GGUF
   loader (both float32); prints the largest difference per tensor that differs.
3. Greedy text from the imported directory for a few prompts.

Exits non-zero when weights differ by more than bf16 rounding or the tokenizer disagrees
with transformers.
"""

import argparse
import json
import pathlib
import random
import sys

import torch
import transformers
from tokenizers import Tokenizer

TEXTS = [
    "The capital of France is",
    "  leading spaces and   multiple   spaces  ",
    "Tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Français: l'élève a mangé une crème brûlée à Noël.",
    "Deutsch: Größenwahn, Straße, Übermäßig.",
    "Русский: Съешь же ещё этих мягких французских булок.",
    "日本語のテキスト、東京タワー。中文：我爱北京天安门。",
    "한국어 문장입니다. العربية: مرحبا بالعالم. עברית: שלום",
    "हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก",
    "Emoji 🎉🚀👩‍👩‍👧‍👦 and symbols ∑∫√∞ ≠ ≤",
    "Code: def f(x):\n    return x**2  # square\n\tprint(f'{x:>10}')",
    "Numbers 1234567890 3.14159 -42 1e-6 0x1F",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "Rare \u0001\u007f \ufffd \U0001F9EC \u200b zero width, literal ▁ underline",
    "Mixed: naïve café résumé 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ＦＵＬＬＷＩＤＴＨ <html><div class=\"x\">Hi</div>",
    "a" * 300 + " " + "ab" * 100,
    "",
    " ",
]
PROMPTS = ["The capital of France is", "Once upon a time,"]


def random_texts(n: int) -> list[str]:
    rng = random.Random(7)
    pieces = ["the", " cat", "  ", "\n", "\t", "é", "ß", "Ж", "日本", "😀", "👩‍👧", "ab", "1234",
              ".", "'s", " ", "▁", "<0x41>", "<b>", "</div>", "\r\n", "ا", "ह", "ก", "\u200b",
              "x" * 17, "İ", "\u0301", "ﬁ", "\ufeff"]
    def char() -> str:
        ranges = [(32, 0x2FFF), (0x3000, 0xD7FF), (0xE000, 0x10FFFF)]
        lo, hi = rng.choice(ranges)
        return chr(rng.randint(lo, hi))
    return ["".join(rng.choice(pieces) if rng.random() < 0.7 else char()
                    for _ in range(rng.randint(1, 30))) for _ in range(n)]


def check_tokenizer(gguf: pathlib.Path, hf_dir: pathlib.Path, n_random: int) -> bool:
    texts = TEXTS + random_texts(n_random)
    mine = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ours = [mine.encode(t).ids for t in texts]
    reference = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    theirs = [reference(t)["input_ids"] for t in texts]
    agree = sum(a == b for a, b in zip(ours, theirs))
    print(f"tokenizer vs transformers' GGUF tokenizer: {agree}/{len(texts)} encodings identical")
    try:
        from llama_cpp import Llama
    except ImportError:
        print("tokenizer vs llama.cpp: skipped (llama-cpp-python not installed)")
    else:
        llama = Llama(str(gguf), vocab_only=True, verbose=False)
        add_bos = json.loads((hf_dir / "tokenizer_config.json").read_text()).get("add_bos_token", False)
        ids = [llama.tokenize(t.encode("utf-8"), add_bos=add_bos, special=True) for t in texts]
        same = [a == b for a, b in zip(ours, ids)]
        with_underline = sum(1 for t, s in zip(texts, same) if not s and "▁" in t)
        print(f"tokenizer vs llama.cpp: {sum(same)}/{len(texts)} encodings identical "
              f"({with_underline} of the {len(texts) - sum(same)} differences contain a literal ▁)")
    return agree == len(texts)


def check_weights(gguf: pathlib.Path, hf_dir: pathlib.Path) -> bool:
    config = json.loads((hf_dir / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    mine = cls.from_pretrained(str(hf_dir), dtype=torch.float32)
    reference = cls.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ours, theirs = mine.state_dict(), reference.state_dict()
    ok = set(ours) == set(theirs)
    if not ok:
        print("tensor names differ:", sorted(set(ours) ^ set(theirs))[:10])
    identical = 0
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name].float(), theirs[name].float()
        if a.shape != b.shape:
            print(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            ok = False
            continue
        if torch.equal(a, b):
            identical += 1
            continue
        diff = (a - b).abs().max().item()
        bf16_step = (b.abs().max().item() or 1.0) * 2.0 ** -8
        print(f"{name}: max |difference| {diff:.3g}")
        ok &= diff <= bf16_step
    print(f"weights vs transformers' GGUF loader: {identical}/{len(ours)} tensors bit-identical")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        for model, label in [(mine, "imported"), (reference, "transformers GGUF")]:
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
            print(f"{label:>17}: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=pathlib.Path)
    parser.add_argument("hf_dir", type=pathlib.Path)
    parser.add_argument("--random-texts", type=int, default=3000)
    args = parser.parse_args()
    ok = check_tokenizer(args.gguf.resolve(), args.hf_dir, args.random_texts)
    ok &= check_weights(args.gguf.resolve(), args.hf_dir)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
