#!/usr/bin/env python3
"""Rebuild crates/trellis-quant/data/calibration.txt, the quantizer's built-in calibration text.

It is made only of text this project wrote and may ship under its own licence: its
documentation (README, ARCHITECTURE, BENCHMARKS, the crates' notes), its Rust sources, and
short multilingual passages written for the project (data/multilingual.txt). Prose and code
are interleaved in 6 KB blocks so that every calibration row mixes both; the result is capped
at MAX_BYTES.

usage: scripts/make_calibration_text.py
"""
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 6000
MAX_BYTES = 400_000


def read(paths):
    return "\n\n".join(open(p, encoding="utf-8").read() for p in paths)


def main():
    prose_files = [os.path.join(ROOT, f) for f in ("README.md", "ARCHITECTURE.md", "BENCHMARKS.md")]
    prose_files += sorted(glob.glob(os.path.join(ROOT, "crates", "*", "NOTES.md")))
    prose_files.append(os.path.join(ROOT, "crates/trellis-quant/data/multilingual.txt"))
    prose = read(prose_files)
    code_files = []
    for crate in ("trellis-runtime", "trellis-codec", "trellis-models", "trellis-format", "trellis-backend"):
        code_files += sorted(glob.glob(os.path.join(ROOT, "crates", crate, "src", "**", "*.rs"), recursive=True))
    code = read(code_files)
    blocks = []
    for i in range(0, max(len(prose), len(code)), CHUNK):
        for source in (prose, code):
            if i < len(source):
                blocks.append(source[i:i + CHUNK])
    text, size = [], 0
    for block in blocks:
        size += len(block.encode()) + 1
        if size > MAX_BYTES:
            break
        text.append(block)
    text = "\n".join(text)
    path = os.path.join(ROOT, "crates/trellis-quant/data/calibration.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{path}: {len(text.encode())} bytes from {len(prose_files)} prose and {len(code_files)} code files")


if __name__ == "__main__":
    main()
