#!/usr/bin/env python3
"""Rebuild crates/trellis-quant/data/calibration.txt, the quantizer's built-in calibration text.

Every part of it was written by or for this project and ships under the project's licence:

* articles:     data/articles.txt, encyclopedic-style articles on many subjects;
* web:          data/web.txt, reviews, how-tos, forum threads, news items, recipes, FAQs;
* stories:      data/stories.txt, very simple children's stories and short fiction;
* technical:    data/technical.txt (manuals, API references, formulas, tables, JSON/YAML/CSV)
                and the project's own documentation (README, ARCHITECTURE, BENCHMARKS, NOTES);
* code:         data/code.txt (Python, C, C++, JavaScript/TypeScript, Go, Java, SQL, shell,
                HTML/CSS) and the project's own Rust sources;
* multilingual: data/multilingual.txt, passages in about 35 languages and scripts.

The sources are cut into blocks of about BLOCK bytes at paragraph breaks and interleaved by
weight (a block goes to whichever source is furthest below its share), so that any prefix of
the text, and so the first rows the quantizer cuts from it, has roughly the same mix. The byte
weights are chosen so that the token shares come out near ExLlamaV3's default calibration mix
(encyclopedic 50, web 20, code 20, technical 10, multilingual 10, children's stories 5; its
random-token rows are added by the quantizer itself). When a source runs out the others go
on; the result is capped at MAX_BYTES. The project's docs and Rust sources are read as committed
(HEAD), so uncommitted work in the checkout does not change the text.

usage: scripts/make_calibration_text.py [--out PATH] [--max-bytes N] [--weights name=w,...]
"""
import argparse
import fnmatch
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "crates", "trellis-quant", "data")
BLOCK = 2000
MAX_BYTES = 400_000
# Byte weights; English prose runs about 2.5-3 bytes a token, code and docs about 2, text in
# other scripts about 1.3, so these give token shares near 50:20:5:10:20:10.
WEIGHTS = {
    "articles": 140,
    "web": 52,
    "stories": 15,
    "technical": 20,
    "code": 36,
    "multilingual": 13,
}


def read(paths):
    return "\n\n".join(open(p, encoding="utf-8").read().strip("\n") for p in paths)


def blocks(text):
    """Cut `text` into blocks of about BLOCK bytes, at blank lines where possible."""
    out, cur, size = [], [], 0
    for para in text.split("\n\n"):
        n = len(para.encode()) + 2
        if cur and size + n > BLOCK:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        while n > 2 * BLOCK:  # one very long paragraph: cut it at a line break
            cut = para.rfind("\n", 0, BLOCK)
            cut = cut if cut > 0 else BLOCK
            out.append(para[:cut])
            para = para[cut:].lstrip("\n")
            n = len(para.encode()) + 2
        cur.append(para)
        size += n
    if cur:
        out.append("\n\n".join(cur))
    return [b for b in out if b.strip()]


def alternate(*lists):
    """Blocks of several lists taken in turn (the project's files between written ones)."""
    out = []
    for i in range(max(map(len, lists))):
        out += [lst[i] for lst in lists if i < len(lst)]
    return out


def committed(paths):
    """The project's own files as committed at HEAD, so that uncommitted work in the checkout
    does not change the text (the data files above are read from the checkout)."""
    return "\n\n".join(
        subprocess.run(["git", "-C", ROOT, "show", f"HEAD:{p}"], check=True, capture_output=True)
        .stdout.decode("utf-8")
        .strip("\n")
        for p in paths
    )


def sources():
    tracked = subprocess.run(
        ["git", "-C", ROOT, "ls-tree", "-r", "--name-only", "HEAD"], check=True, capture_output=True
    ).stdout.decode("utf-8").splitlines()
    docs = ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md"]
    docs += sorted(p for p in tracked if fnmatch.fnmatch(p, "crates/*/NOTES.md") and p.count("/") == 2)
    rust = []
    for crate in ("trellis-runtime", "trellis-codec", "trellis-models", "trellis-format", "trellis-backend"):
        rust += sorted(p for p in tracked if p.startswith(f"crates/{crate}/src/") and p.endswith(".rs"))

    def data(name):
        return read([os.path.join(DATA, name)])

    return {
        "articles": blocks(data("articles.txt")),
        "web": blocks(data("web.txt")),
        "stories": blocks(data("stories.txt")),
        "technical": alternate(blocks(data("technical.txt")), blocks(committed(docs))),
        "code": alternate(blocks(data("code.txt")), blocks(committed(rust))),
        "multilingual": blocks(data("multilingual.txt")),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(DATA, "calibration.txt"))
    ap.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    ap.add_argument("--weights", default="", help="override, e.g. articles=100,code=50")
    args = ap.parse_args()
    weights = dict(WEIGHTS)
    for item in filter(None, args.weights.split(",")):
        name, w = item.split("=")
        weights[name] = float(w)
    srcs = {k: v for k, v in sources().items() if weights.get(k, 0) > 0}
    emitted = {k: 0 for k in srcs}
    pos = {k: 0 for k in srcs}
    text, size = [], 0
    while True:
        live = [k for k in srcs if pos[k] < len(srcs[k])]
        if not live:
            break
        k = min(live, key=lambda s: (emitted[s] / weights[s], s))
        block = srcs[k][pos[k]]
        pos[k] += 1
        n = len(block.encode()) + 2
        if size + n > args.max_bytes:
            break
        text.append(block)
        emitted[k] += n
        size += n
    text = "\n\n".join(text) + "\n"
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    shares = ", ".join(f"{k} {emitted[k] // 1000} KB" for k in srcs)
    print(f"{args.out}: {len(text.encode())} bytes ({shares})")


if __name__ == "__main__":
    main()
