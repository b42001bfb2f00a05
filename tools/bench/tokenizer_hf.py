#!/usr/bin/env python3
"""Hugging Face `tokenizers` encoding throughput: the baseline of bench_tokenizer.

  tokenizer_hf.py --tokenizer tok.json --corpus corpus.txt [--doc-bytes 4096] [--threads 2]
                  [--repeat 3] [--json]

Cuts the corpus into documents exactly as bench_tokenizer does (each ends at the first line feed
at least --doc-bytes after its start) and reports MB/s, best of --repeat passes:
  encode        tokenizer.encode(doc) for every document in turn (one thread), or encode_batch
                on one thread when that is faster (measured in a child process with
                RAYON_NUM_THREADS=1)
  encode_batch  encode_batch (or encode_batch_fast where it exists, if faster) on --threads
                threads (RAYON_NUM_THREADS)
No special tokens are added, as in dsx. Needs `tokenizers` (tools/python-env.sh installs it into
<repo>/.venv). Reference tool only: dsx itself never runs Python.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def split_documents(data, doc_bytes):
    docs, start = [], 0
    while start < len(data):
        end = data.find(b"\n", min(len(data), start + doc_bytes))
        end = len(data) if end < 0 else end + 1
        docs.append(data[start:end])
        start = end
    return docs


def best_seconds(repeat, body):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        body()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(args):
    """MB/s of the encode loop and of batch encoding on the RAYON_NUM_THREADS set by the caller."""
    import tokenizers
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(args.tokenizer)
    data = open(args.corpus, "rb").read()
    docs = [d.decode("utf-8") for d in split_documents(data, args.doc_bytes)]
    mb = len(data) / 1e6
    counted = {}

    def loop():
        counted["tokens"] = sum(len(tok.encode(d, add_special_tokens=False).ids) for d in docs)

    def batch():
        tok.encode_batch(docs, add_special_tokens=False)

    def batch_fast():
        tok.encode_batch_fast(docs, add_special_tokens=False)

    loop_s = best_seconds(args.repeat, loop)
    batch_s = best_seconds(args.repeat, batch)
    if hasattr(tok, "encode_batch_fast"):
        batch_s = min(batch_s, best_seconds(args.repeat, batch_fast))
    return {"version": tokenizers.__version__, "encode_mb_s": mb / loop_s, "batch_mb_s": mb / batch_s,
            "tokens": counted["tokens"]}


def child(args, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    command = [sys.executable, os.path.abspath(__file__), "--tokenizer", args.tokenizer, "--corpus", args.corpus,
               "--doc-bytes", str(args.doc_bytes), "--repeat", str(args.repeat), "--measure-only"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json")
    parser.add_argument("--corpus", required=True, help="UTF-8 text file")
    parser.add_argument("--doc-bytes", type=int, default=4096, help="document size (default 4096)")
    parser.add_argument("--threads", type=int, default=2, help="threads for encode_batch (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="passes per figure; the best counts (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for bench_tokenizer)")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        print("tokenizer_hf.py: HF tokenizers is not installed (run tools/python-env.sh and use .venv/bin/python)")
        return 2
    if args.measure_only:
        print(json.dumps(measure(args)))
        return 0
    # Rayon's pool size is fixed at first use, so each thread count gets its own process.
    one = child(args, 1)
    many = child(args, args.threads)
    result = {"version": one["version"], "tokens": one["tokens"],
              "encode_mb_s": max(one["encode_mb_s"], one["batch_mb_s"]), "batch_mb_s": many["batch_mb_s"]}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"HF tokenizers {result['version']}: encode {result['encode_mb_s']:.2f} MB/s (1 thread), "
              f"encode_batch {result['batch_mb_s']:.2f} MB/s ({args.threads} threads), {result['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
