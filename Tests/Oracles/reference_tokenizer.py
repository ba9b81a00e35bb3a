"""Reference token ids for the BPE tokenizer test, from Hugging Face `tokenizers`.

The GGUF carries SmolLM2's vocabulary and merges; SmolLM2's tokenizer.json (not reachable from
here) configures them as a byte-level BPE with the pre-tokenizer Sequence[Digits(individual),
ByteLevel(add_prefix_space=False, use_regex=True)], which is what this script rebuilds. Usage:

    python3 Tests/Oracles/reference_tokenizer.py MODEL.gguf < text     # prints the ids, comma-separated

Needs `pip install gguf tokenizers`.
"""
import sys

import gguf
from tokenizers import Tokenizer, models, pre_tokenizers, decoders


def load(path):
    r = gguf.GGUFReader(path)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty in (3, 4)])
    return tok


if __name__ == "__main__":
    tok = load(sys.argv[1])
    text = sys.stdin.read()
    ids = tok.encode(text, add_special_tokens=False).ids
    print(",".join(map(str, ids)))
    assert tok.decode(ids, skip_special_tokens=False) == text, "reference tokenizer does not round-trip"
