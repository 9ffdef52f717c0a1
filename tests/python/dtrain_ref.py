"""Reference implementations of dtrain's documented formats, written from the docs alone:
the hashing tokenizer (src/data/tokenize.rs), the shard layout (src/data/shard.rs), the
vocabulary file (src/data/vocab.rs)."""

import struct
import unicodedata

import xxhash

KIND_WORD = 0x5744_5452_4149_4E57
KIND_CHAR = 0x4344_5452_4149_4E43
KIND_WORD_NGRAM = 0x4E44_5452_4149_4E4E
CONNECTORS = "'\u2019-_."


NO_SPACE_RANGES = [
    (0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x2E80, 0x2FDF), (0x3005, 0x3007),
    (0x3021, 0x3029), (0x3038, 0x303B), (0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F), (0x20000, 0x2FA1F), (0x30000, 0x323AF),
]


def is_no_space(c):
    o = ord(c)
    return any(lo <= o <= hi for lo, hi in NO_SPACE_RANGES)


def is_ignorable(c):
    o = ord(c)
    return o in (0x00AD, 0x200B, 0x2060, 0xFEFF) or 0xFE00 <= o <= 0xFE0F or 0xE0100 <= o <= 0xE01EF


def is_word(c):
    # Alphanumeric, any mark (category M*), or a zero-width (non-)joiner; never a no-space script.
    return (c.isalnum() or unicodedata.category(c).startswith("M") or c in "\u200c\u200d") and not is_no_space(c)


def segment(s, max_words):
    """Units as (kind, text): 'w' word, 'p' punctuation, 'r' no-space run."""
    units, i, kept = [], 0, 0
    while i < len(s):
        if kept >= max_words:
            break
        c = s[i]
        if c.isspace():
            i += 1
        elif is_no_space(c):
            j = i
            while j < len(s) and is_no_space(s[j]) and kept < max_words:
                j += 1
                kept += 1
            units.append(("r", s[i:j]))
            i = j
        elif is_word(c):
            j = i + 1
            while j < len(s):
                d = s[j]
                if is_word(d):
                    j += 1
                elif (d in CONNECTORS or d == ",") and j + 1 < len(s):
                    n = s[j + 1]
                    joins = (s[j - 1].isdigit() and n.isdigit()) if d == "," else is_word(n)
                    if not joins:
                        break
                    j += 2
                else:
                    break
            units.append(("w", s[i:j]))
            kept += 1
            i = j
        else:
            units.append(("p", c))
            kept += 1
            i += 1
    return units


def tokenize(text, spec):
    B, seed = spec["buckets"], spec["hash_seed"]

    def h(kind, payload):
        return xxhash.xxh3_64_intdigest(payload.encode("utf-8"), seed=seed ^ kind) % B

    s = "".join(c for c in text if not is_ignorable(c))
    s = s.lower() if spec["lowercase"] else s
    ids, window = [], []
    lo, hi = spec["char_ngram_min"], spec["char_ngram_max"]
    for kind, u in segment(s, spec["max_words"]):
        if kind in "wp":
            ids.append(h(KIND_WORD, u))
            if kind == "w" and hi > 0:
                b = "<" + u + ">"
                for i in range(len(b)):
                    for n in range(lo, min(hi, len(b) - i) + 1):
                        if n != len(b):
                            ids.append(h(KIND_CHAR, b[i:i + n]))
            if spec["word_ngrams"] >= 2:
                window = (window + [u])[-spec["word_ngrams"]:]
                for n in range(2, len(window) + 1):
                    ids.append(h(KIND_WORD_NGRAM, "\x1f".join(window[-n:])))
        else:
            window = []
            for i in range(len(u)):
                for n in range(1, min(spec["cjk_ngram_max"], len(u) - i) + 1):
                    ids.append(h(KIND_CHAR, u[i:i + n]))
    return ids


def words(text, spec):
    """The word units of a text (kind 'w', normalised, after truncation), in order."""
    s = "".join(c for c in text if not is_ignorable(c))
    s = s.lower() if spec["lowercase"] else s
    return [u for kind, u in segment(s, spec["max_words"]) if kind == "w"]


def read_shard(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"DTSHARD\0", "magic"
    version, header_len = struct.unpack_from("<II", data, 8)
    assert (version, header_len) == (2, 160)
    n, m, tok_hash = struct.unpack_from("<QQQ", data, 16)
    shard_index, num_shards, split = struct.unpack_from("<III", data, 40)
    (w,) = struct.unpack_from("<Q", data, 56)
    sections = struct.unpack_from("<7Q", data, 64)
    file_len, payload_sum, _, _, header_sum = struct.unpack_from("<5Q", data, 120)
    assert header_sum == xxhash.xxh3_64_intdigest(data[:152]), "header checksum"
    assert file_len == len(data)
    assert payload_sum == xxhash.xxh3_64_intdigest(data[160:]), "payload checksum"
    ids = struct.unpack_from(f"<{m}I", data, sections[0])
    word_ids = struct.unpack_from(f"<{w}I", data, sections[1])
    offsets = struct.unpack_from(f"<{n + 1}Q", data, sections[2])
    word_offsets = struct.unpack_from(f"<{n + 1}Q", data, sections[3])
    labels = struct.unpack_from(f"<{n}i", data, sections[4])
    sample_ids = struct.unpack_from(f"<{n}Q", data, sections[5])
    hidden = struct.unpack_from(f"<{n}i", data, sections[6])
    docs = [list(ids[offsets[i]:offsets[i + 1]]) for i in range(n)]
    doc_words = [list(word_ids[word_offsets[i]:word_offsets[i + 1]]) for i in range(n)]
    return dict(tok_hash=tok_hash, index=shard_index, num_shards=num_shards, split=split,
                docs=docs, words=doc_words, labels=labels, sample_ids=sample_ids, hidden=hidden,
                checksum=payload_sum)


def read_vocab(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"DTVOCAB\0", "magic"
    version, header_len, count, length, payload_sum, header_sum = struct.unpack_from("<IIQQQQ", data, 8)
    assert (version, header_len) == (1, 48)
    assert header_sum == xxhash.xxh3_64_intdigest(data[:40]), "header checksum"
    payload = data[48:]
    assert len(payload) == length and payload_sum == xxhash.xxh3_64_intdigest(payload), "payload"
    out, at = [], 0
    for _ in range(count):
        (n,) = struct.unpack_from("<I", payload, at)
        out.append(payload[at + 4:at + 4 + n].decode("utf-8"))
        at += 4 + n
    assert at == len(payload)
    return out


