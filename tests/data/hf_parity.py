#!/usr/bin/env python3
"""dsx's tokenizer against Hugging Face `tokenizers`: identical ids on a mixed corpus.

  hf_parity.py --dsx BUILD/bin/dsx --repo REPO --workdir DIR

Builds byte-level BPE tokenizers with HF (GPT-2 style ByteLevel, DeepSeek-V3's Split sequence,
variants with ignore_merges, add_prefix_space and added tokens with lstrip/rstrip/single_word),
has dsx encode a mixed test corpus with each, and compares with HF's ids. HF takes only valid
UTF-8; dsx takes any bytes and treats each maximal run of invalid bytes as a pre-token of its
own, with the valid text around it tokenized independently. The reference for such a document
is built from HF alone: HF encodes each valid run, HF's BPE model tokenizes each invalid run.
Then the other way round: a tokenizer trained by `dsx tokenizer train` must load in HF and give
the same ids. Exit 0: all equal; 1: a difference (printed); 77: skipped (reason printed).

Python here is only a reference check; dsx itself never runs Python.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

SKIP = 77


def skip(reason):
    print(f"SKIPPED: {reason}")
    sys.exit(SKIP)


def ensure_hf_python(args):
    """Re-runs this script under REPO/.venv/bin/python with `tokenizers`, installing it first."""
    venv_python = os.path.join(args.repo, ".venv", "bin", "python")
    if os.environ.get("DSX_HF_PARITY_IN_VENV") == "1":
        return
    def has_tokenizers():
        return os.path.exists(venv_python) and subprocess.run(
            [venv_python, "-c", "import tokenizers"], capture_output=True).returncode == 0
    if not has_tokenizers():
        setup = os.path.join(args.repo, "tools", "python-env.sh")
        result = subprocess.run(["bash", setup], capture_output=True, text=True)
        if not has_tokenizers():
            skip(f"HF tokenizers is not available in {venv_python} ({result.stdout.strip() or result.stderr.strip()})")
    os.environ["DSX_HF_PARITY_IN_VENV"] = "1"
    os.execv(venv_python, [venv_python, os.path.abspath(__file__)] + sys.argv[1:])


# ---- corpora ---------------------------------------------------------------------------------

ENGLISH = ["The quick brown fox jumps over the lazy dog.", "It's what they'd've wanted, isn't it? I'LL SEE.",
           "Tokenizers split text into pieces; models only ever see the ids.", "Mr. O'Neil paid $1,234.56 on 2024-03-15."]
GERMAN = ["Grüße aus München! Die Bäume blühen über den Flüssen.", "Äpfel, Öl und Übermut: straße, Straße, STRASSE."]
CHINESE = ["中文分词测试，你好世界。", "深度求索发布了新的模型，参数量为六千七百亿。", "日本語のテキストとカタカナ、ひらがな。"]
OTHER = ["Привет, мир! Ελληνικά γράμματα.", "مرحبا بالعالم", "café naïve résumé e\u0301 a\u0308", "한국어 문장입니다."]
CODE = ["def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }\n",
        "const auto& [k, v] = *map.find(\"key\");\n\treturn v;", "<div class=\"a\">&nbsp;</div>\n",
        "SELECT id, name FROM users WHERE age >= 18;"]
EMOJI = ["😀🎉👍🏽 family: 👨\u200d👩\u200d👧\u200d👦 flags 🇩🇪🇨🇳", "✓ ✗ → ∑ ∞ ≠ ≤"]
SPACE = ["  two  spaces\tand\ttabs\n\n\nthree newlines", "trailing   ", "\r\n\r\nwindows\r\n", "\u00a0nbsp\u3000ideo",
         " \n \n  \t  \n", "   leading"]
DIGITS = ["3.14159265358979", "1234567890 0x1F 1e-9 ١٢٣ ½", "2024年3月15日", "v1.2.3-rc4"]
SPECIAL_MIX = ["<|begin_of_sentence|>Hello<|end_of_sentence|>", "<think>step 1</think>answer", "a<thin k>b <think>",
               "x <|tool|>  y", "@@ a@@b @@", "<|pad|><|pad|>"]
ALL = ENGLISH + GERMAN + CHINESE + OTHER + CODE + EMOJI + SPACE + DIGITS


def training_corpus(rng, lines=3000):
    pool = ENGLISH + GERMAN + CHINESE + OTHER + CODE + EMOJI + SPACE + DIGITS
    words = " ".join(pool).split()
    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.5:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))))
        elif kind < 0.8:
            out.append(rng.choice(pool))
        else:
            out.append(str(rng.randint(0, 10**rng.randint(1, 12))) + rng.choice([" ", "\n", "  ", "\t"]))
    return "\n".join(out)


def test_documents(rng):
    docs = [s.encode() for s in ALL + SPECIAL_MIX]
    docs.append("\n".join(ALL).encode())
    # Invalid UTF-8: stray continuation bytes, truncated sequences, overlong forms, surrogates.
    docs += [b"abc\xff\xfedef", b"\x80\x81 lone continuation", "Grüße".encode()[:4] + b" cut", b"\xc0\xaf overlong",
             b"\xed\xa0\x80 surrogate", b"\xf4\x90\x80\x80 too big", b"<think>\xff</think>", b"  \xe4\xb8 \xe4\xb8\xad",
             b"\x00\x01\x02 control\x7f", bytes(range(256))]
    # Pre-tokens far longer than dsx's linear merge limit (its heap path).
    docs += [b" " * 20000, b"  " * 3000 + b"x" + b"\n" * 3000, "中文分词".encode() * 2000, bytes(range(128, 256)) * 40]
    for _ in range(30):  # random mixtures of the above
        parts = [rng.choice(docs) for _ in range(rng.randint(1, 4))]
        docs.append(b"".join(parts))
    return docs


# ---- HF reference ----------------------------------------------------------------------------

def byte_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


B2U = byte_to_unicode()


def utf8_runs(data):
    """(is_valid, bytes) runs, invalid bytes as Python's decoder sees them (surrogateescape)."""
    text = data.decode("utf-8", errors="surrogateescape")
    runs, current, valid = [], [], None
    for ch in text:
        ok = not (0xDC80 <= ord(ch) <= 0xDCFF)
        b = ch.encode("utf-8") if ok else bytes([ord(ch) - 0xDC00])
        if valid is not None and ok != valid:
            runs.append((valid, b"".join(current)))
            current = []
        valid = ok
        current.append(b)
    if current:
        runs.append((valid, b"".join(current)))
    return runs


def hf_ids(tok, data):
    ids = []
    for valid, run in utf8_runs(data):
        if valid:
            ids += tok.encode(run.decode("utf-8"), add_special_tokens=False).ids
        else:
            ids += [t.id for t in tok.model.tokenize("".join(B2U[b] for b in run))]
    return ids


# ---- dsx -------------------------------------------------------------------------------------

def dsx_ids(dsx, tokenizer_path, docs, work):
    """dsx's ids for every document, from one `dsx tokenizer encode` run."""
    files = []
    for i, data in enumerate(docs):
        files.append(os.path.join(work, f"doc{i:04d}.bin"))
        with open(files[-1], "wb") as f:
            f.write(data)
    command = [dsx, "tokenizer", "encode", "-t", tokenizer_path]
    for path in files:
        command += ["-i", path]
    out = subprocess.run(command, capture_output=True)
    if out.returncode != 0:
        raise RuntimeError(f"dsx tokenizer encode failed ({out.returncode}): {out.stderr.decode(errors='replace')}")
    lines = out.stdout.decode().split("\n")
    return [[int(x) for x in line.split()] for line in lines[:len(docs)]]


def dsx_decode(dsx, tokenizer_path, ids):
    out = subprocess.run([dsx, "tokenizer", "decode", "-t", tokenizer_path] + [str(i) for i in ids], capture_output=True)
    if out.returncode != 0:
        raise RuntimeError(f"dsx tokenizer decode failed: {out.stderr.decode(errors='replace')}")
    return out.stdout


# ---- tokenizers under test -------------------------------------------------------------------

SPECIALS = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>", "<think>", "</think>"]


def deepseek_v3_pre_tokenizer(tk):
    """DeepSeek-V3's tokenizer.json pre_tokenizer: three isolating Splits, then ByteLevel."""
    from tokenizers import pre_tokenizers, Regex
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
                                   "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
                             behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_hf(corpus_path, pre_tokenizer, vocab_size):
    from tokenizers import Tokenizer, models, decoders, trainers, pre_tokenizers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([corpus_path], trainer=trainer)
    return tok


def build_tokenizers(tk, work, corpus_path):
    from tokenizers import AddedToken, pre_tokenizers
    made = {}

    gpt2 = train_hf(corpus_path, pre_tokenizers.ByteLevel(add_prefix_space=False), 2000)
    gpt2.add_tokens([AddedToken("<|tool|>", lstrip=True, rstrip=True, normalized=False),
                     AddedToken("@@", single_word=True, normalized=True)])
    made["hf-gpt2"] = gpt2

    made["hf-deepseek-v3"] = train_hf(corpus_path, deepseek_v3_pre_tokenizer(tk), 2000)

    paths = {}
    for name, tok in made.items():
        paths[name] = os.path.join(work, name + ".json")
        tok.save(paths[name])

    # Variants written by editing the JSON, the way such files arrive in practice.
    def variant(base, name, edit, pairs=False):
        j = json.load(open(paths[base]))
        edit(j)
        if not pairs:  # the "a b" merges form of older files and DeepSeek-V3's
            j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
        path = os.path.join(work, name + ".json")
        json.dump(j, open(path, "w"), ensure_ascii=False)
        paths[name] = path

    variant("hf-deepseek-v3", "hf-deepseek-v3-string-merges", lambda j: None)
    variant("hf-deepseek-v3", "hf-deepseek-v3-ignore-merges", lambda j: j["model"].__setitem__("ignore_merges", True))
    variant("hf-gpt2", "hf-gpt2-prefix-space", lambda j: j["pre_tokenizer"].__setitem__("add_prefix_space", True),
            pairs=True)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsx", required=True, help="the dsx executable")
    parser.add_argument("--repo", required=True, help="repository root (holds .venv and tools/python-env.sh)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    if not os.path.exists(args.dsx):
        print(f"dsx executable not found: {args.dsx}")
        return 1
    ensure_hf_python(args)
    import tokenizers as tk
    from tokenizers import Tokenizer
    print(f"HF tokenizers {tk.__version__}")

    work = args.workdir or tempfile.mkdtemp(prefix="dsx-hf-parity-")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(20240315)
    corpus_path = os.path.join(work, "corpus.txt")
    with open(corpus_path, "w", encoding="utf-8") as f:
        f.write(training_corpus(rng))
    docs = test_documents(rng)

    paths = build_tokenizers(tk, work, corpus_path)
    # dsx's own trainer; HF must read what it writes.
    paths["dsx-trained"] = os.path.join(work, "dsx-trained.json")
    subprocess.run([args.dsx, "tokenizer", "train", "--quiet", "--vocab-size", "1500", "-o", paths["dsx-trained"],
                    corpus_path], check=True)

    failures = 0
    for name, path in paths.items():
        hf = Tokenizer.from_file(path)  # for dsx-trained: this is the "HF loads dsx's JSON" check
        compared = tokens = 0
        all_got = dsx_ids(args.dsx, path, docs, work)
        for doc, got in zip(docs, all_got):
            expected = hf_ids(hf, doc)
            compared += 1
            tokens += len(expected)
            if got != expected:
                failures += 1
                first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                print(f"MISMATCH {name}: document {doc[:80]!r}\n  dsx {got[max(0, first - 3):first + 5]}"
                      f"\n  HF  {expected[max(0, first - 3):first + 5]} (first difference at token {first})")
        # decode(encode(s)) == s through the CLI too (not with add_prefix_space, which adds a space).
        if "prefix-space" not in name:
            for doc, ids in list(zip(docs, all_got))[::7]:
                back = dsx_decode(args.dsx, path, ids)
                if back != doc:
                    failures += 1
                    print(f"ROUND TRIP {name}: {doc[:60]!r} came back as {back[:60]!r}")
        print(f"{name}: {compared} documents, {tokens} tokens compared")
    if failures:
        print(f"FAILED: {failures} differences")
        return 1
    print("OK: dsx and HF tokenizers agree on every document")
    return 0


if __name__ == "__main__":
    sys.exit(main())
