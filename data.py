"""
Data for every stage: the tokenizer, token shards for stage 1, image-text data for stage 2 and
robot episodes for stage 3. Stores, tokenizes and batches; the language and scenes of the built-in
world are made in eval_sim.py. Imports nothing of ours.

    documents (.txt / .jsonl / generated) --Tokenizer--> token shards (.bin) --TokenLoader--> (x, y)

Token shard = a 256 x int32 header (magic, version, bytes per token, token count), then the tokens
as uint16 (vocab <= 65536) or uint32, as in llm.c. Read by memory-mapping.
"""
import base64
import copy
import glob
import hashlib
import importlib
import io
import heapq
import json
import os
import threading
import unicodedata
import zipfile
from collections import Counter, defaultdict

import numpy as np
import torch


class UserError(Exception):
    """Bad input from a person: the CLIs print it as one line and exit with code 2."""


# numpy parses each .npy header with ast.literal_eval, and CPython 3.11's compile() is not thread-safe
# ("SystemError: AST constructor recursion depth mismatch" under concurrent requests): one parse at a time.
_NPZ_LOCK = threading.Lock()


def read_npz(data):
    """The arrays of an in-memory .npz (bytes), never unpickling; safe to call from many threads."""
    with _NPZ_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_durably(path, write, mode="w"):
    """Write a file through write(f) under a temporary name, flushed and fsync'ed, then renamed over
    path and the directory fsync'ed: after a kill or a power cut the file is whole or absent."""
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path):
    """Make a rename inside the directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained here, served by tiktoken

# GPT-4's pre-tokenization: words, 1-3 digit numbers, punctuation runs, whitespace kept separate,
# so merges never cross a word boundary.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
# Every stage's special tokens exist from stage 1 on, so later stages need not grow the vocab
# (they still can: a user-supplied .tiktoken file has none of them).
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|image|>", "<|action|>", "<|user|>", "<|assistant|>"]


def train_bpe(texts, vocab_size, pattern=GPT4_PATTERN):
    """Byte-level BPE: returns mergeable ranks {token bytes: rank}, the 256 bytes first.

    Words (pre-tokenized chunks) are counted once with their frequency; pair counts are kept
    incrementally: a merge only revisits the words that contain the merged pair, and a max-heap
    with lazy deletion finds the next most frequent pair. Ties break on the smaller pair ids, so
    training is deterministic.
    """
    import regex
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if n_merges < 0:
        raise UserError(f"vocab_size {vocab_size} too small: need at least {256 + len(SPECIAL_TOKENS)}")
    compiled = regex.compile(pattern)
    word_counts = Counter()
    for text in texts:
        word_counts.update(compiled.findall(text))
    words = [list(w.encode("utf-8")) for w in word_counts]
    freqs = list(word_counts.values())

    pair_counts = defaultdict(int)
    pair_words = defaultdict(set)  # pair -> indices of words that (may) contain it
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[wi]
            pair_words[pair].add(wi)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(token_bytes)}
    merges_done = 0
    while merges_done < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale heap entry
        if -neg_count < 2:
            break  # nothing left worth merging
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        new_id = ranks.get(merged)
        if new_id is None:  # a new token (the same bytes can arise from two different pairs)
            new_id = len(token_bytes)
            token_bytes.append(merged)
            ranks[merged] = new_id
            merges_done += 1
        changed = set()
        for wi in pair_words.pop(pair):
            w, f = words[wi], freqs[wi]
            old_pairs = list(zip(w, w[1:]))
            if pair not in old_pairs:
                continue
            merged_word, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    merged_word.append(new_id)
                    i += 2
                else:
                    merged_word.append(w[i])
                    i += 1
            words[wi] = merged_word
            for p in old_pairs:
                pair_counts[p] -= f
                changed.add(p)
            for p in zip(merged_word, merged_word[1:]):
                pair_counts[p] += f
                pair_words[p].add(wi)
                changed.add(p)
        pair_counts.pop(pair, None)
        changed.discard(pair)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                pair_counts.pop(p)
    return ranks


class Tokenizer:
    """A tiktoken Encoding over our BPE ranks plus SPECIAL_TOKENS (ids after the ranks).

    A pretrained model's tokenizer (hf.load_tokenizer) keeps its own special tokens and names our
    roles ('<|image|>', '<|endoftext|>', ...) by `roles`: role name -> one of its token ids, so the
    prompt builders use the model's own image and end-of-text tokens. nfc: Unicode NFC before
    encoding (Qwen's tokenizer.json normalizer)."""

    def __init__(self, ranks, pattern=GPT4_PATTERN, special_tokens=None, roles=None, nfc=False):
        import tiktoken
        self.ranks, self.pattern, self.nfc = ranks, pattern, nfc
        if special_tokens is None:
            special_tokens = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.special_tokens = dict(special_tokens)
        self.roles = dict(roles or {})
        self.enc = tiktoken.Encoding(name="nanofoundry", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)

    @property
    def special_ids(self):
        """Every special name -> id: the tokens themselves and the roles that alias them."""
        return {**self.special_tokens, **self.roles}

    @classmethod
    def train(cls, texts, vocab_size):
        return cls(train_bpe(texts, vocab_size))

    @property
    def n_vocab(self):
        return self.enc.n_vocab

    def special(self, name):
        """Id of a special token such as '<|image|>' (or of the model's token in that role)."""
        if name not in self.special_ids:
            raise UserError(f"tokenizer has no special token {name}; it has {sorted(self.special_ids)}")
        return self.special_ids[name]

    def image_placeholders(self, n):
        """n <|image|> placeholders, inside the model's own image markers when its tokenizer has
        them (roles <|image_start|>, <|image_global|>, <|image_end|>: SmolVLM's global image is
        <fake_token_around_image> <global-img> <image> x n <fake_token_around_image>)."""
        ids = [self.special("<|image|>")] * n
        if n and "<|image_start|>" in self.roles:
            ids = [self.roles[r] for r in ("<|image_start|>", "<|image_global|>") if r in self.roles] + ids + \
                  [self.roles["<|image_end|>"]]
        return ids

    @property
    def eot_id(self):
        return self.special("<|endoftext|>")

    def encode(self, text, allow_special=False):
        """Special-token strings in text are plain text unless allow_special (chat templates)."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        if self.nfc:
            texts = [unicodedata.normalize("NFC", t) for t in texts]
        return self.enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def save(self, path):
        """One JSON file: the pre-tokenization pattern, ranks (base64 bytes in rank order), specials."""
        by_rank = sorted(self.ranks.items(), key=lambda kv: kv[1])
        obj = {"pattern": self.pattern, "special_tokens": self.special_tokens,
               "ranks": [base64.b64encode(b).decode("ascii") for b, _ in by_rank]}
        if any(r != i for i, (_, r) in enumerate(by_rank)):  # a pretrained model's (hf.py): specials among the ranks
            obj["rank_ids"] = [r for _, r in by_rank]
        if self.roles or self.nfc:  # a pretrained model's tokenizer (hf.py); ours have neither
            obj.update(roles=self.roles, nfc=self.nfc)
        write_durably(path, lambda f: json.dump(obj, f))

    @classmethod
    def load(cls, path):
        """Our tokenizer.json, or a user's tiktoken ranks file (.tiktoken: 'base64 rank' per line,
        GPT-4 pattern assumed, our special tokens appended after the highest rank)."""
        if not os.path.isfile(path):
            raise UserError(f"tokenizer file not found: {path}")
        if path.endswith(".tiktoken"):
            ranks = {}
            with open(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        token, rank = line.split()
                        ranks[base64.b64decode(token)] = int(rank)
                    except ValueError:
                        raise UserError(f"{path}:{lineno}: expected '<base64 token> <rank>'") from None
            if not ranks:
                raise UserError(f"{path} holds no ranks")
            start = max(ranks.values()) + 1
            return cls(ranks, GPT4_PATTERN, {s: start + i for i, s in enumerate(SPECIAL_TOKENS)})
        try:
            with open(path) as f:
                obj = json.load(f)
            if "rank_ids" in obj:  # a pretrained model's ranks need not be 0..n-1 (its specials sit among them)
                ranks = {base64.b64decode(t): i for t, i in zip(obj["ranks"], obj["rank_ids"])}
            else:
                ranks = {base64.b64decode(t): i for i, t in enumerate(obj["ranks"])}
            return cls(ranks, obj["pattern"], obj["special_tokens"], obj.get("roles"), obj.get("nfc", False))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON / UTF-8 / base64, fields missing
            raise UserError(f"{path} is not a tokenizer file (expected tokenizer.json with pattern, "
                            f"ranks, special_tokens, or a .tiktoken ranks file): {e}") from None


# -----------------------------------------------------------------------------------------------
# Documents -> token shards

SHARD_MAGIC = 20260426
SHARD_VERSION = 1
HEADER_INTS = 256


def read_documents(paths):
    """Yield documents from .txt files (one file = one document) and .jsonl files (one
    {"text": ...} object per line). Missing, empty or malformed files are errors."""
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"data file not found: {path}")
        if os.path.getsize(path) == 0:
            raise UserError(f"data file is empty: {path}")
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                        assert isinstance(text, str)
                    except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                        raise UserError(f"{path}:{lineno}: expected a JSON object with a string 'text' field") from None
                    yield text
        else:
            raise UserError(f"unsupported data file {path}: expected .txt or .jsonl")


def expand_paths(spec):
    """'a.txt,dir/*.jsonl' -> sorted list of paths; a pattern that matches nothing is an error."""
    paths = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        matches = sorted(glob.glob(part)) if any(ch in part for ch in "*?[") else [part]
        if not matches:
            raise UserError(f"no data files match {part}")
        paths.extend(matches)
    return paths


def write_shard(path, tokens, vocab_size):
    tokens = np.asarray(tokens)
    dtype = np.uint16 if vocab_size <= 2 ** 16 else np.uint32
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:4] = [SHARD_MAGIC, SHARD_VERSION, np.dtype(dtype).itemsize, len(tokens)]
    write_durably(path, lambda f: (f.write(header.tobytes()), f.write(tokens.astype(dtype).tobytes())), "wb")


def read_shard(path):
    """Memory-map a shard's tokens, checking the header against the file size."""
    if not os.path.isfile(path):
        raise UserError(f"token shard not found: {path}")
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS) if size >= 4 * HEADER_INTS else None
    if header is None or header[0] != SHARD_MAGIC:
        raise UserError(f"{path} is not a token shard (expected magic {SHARD_MAGIC} in a {4 * HEADER_INTS}-byte header)")
    if header[1] != SHARD_VERSION or header[2] not in (2, 4):
        raise UserError(f"{path}: unsupported shard version {header[1]} or token size {header[2]} (expected version {SHARD_VERSION}, 2 or 4 bytes)")
    count, itemsize = int(header[3]), int(header[2])
    if size != 4 * HEADER_INTS + count * itemsize:
        raise UserError(f"{path}: header says {count} tokens but the file holds {(size - 4 * HEADER_INTS) / itemsize:.0f}: truncated or corrupt")
    return np.memmap(path, dtype=np.uint16 if itemsize == 2 else np.uint32, mode="r", offset=4 * HEADER_INTS, shape=(count,))


def tokenize_to_shards(docs, tokenizer, out_dir, split, shard_tokens=50_000_000, batch_docs=1024):
    """Encode documents (each preceded by <|endoftext|>, which also serves as BOS) into
    out_dir/{split}_000.bin, ... Returns the shard paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths, buf, n_buf = [], [], 0

    def flush():
        nonlocal buf, n_buf
        path = os.path.join(out_dir, f"{split}_{len(paths):03d}.bin")
        write_shard(path, np.concatenate(buf), tokenizer.n_vocab)
        paths.append(path)
        buf, n_buf = [], 0

    batch = []
    for doc in list(docs) + [None]:
        if doc is not None:
            batch.append(doc)
            if len(batch) < batch_docs:
                continue
        for ids in tokenizer.encode_batch(batch):
            buf.append(np.array([tokenizer.eot_id] + ids, dtype=np.uint32))
            n_buf += len(ids) + 1
        batch = []
        if n_buf >= shard_tokens:
            flush()
    if n_buf:
        flush()
    if not paths:
        raise UserError(f"no documents for the {split} split")
    return paths


def shard_paths(data_dir, split):
    paths = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))
    if not paths:
        raise UserError(f"no {split} token shards in {data_dir}")
    return paths


class TokenLoader:
    """Batches (x, y) of shape (B, T) read in order from token shards.

    All ranks step through one stream in lockstep: each call takes the next world_size * B * T
    tokens (+1 for the shifted targets), rank r gets the r-th slice, so ranks never share data and
    one process with grad_accum = n sees exactly the data of n processes. When a shard runs out the
    stream moves to the next one (wrapping around: a new epoch). The position is the resumable
    state, `state_dict()` / `load_state_dict()`.
    """

    def __init__(self, paths, batch_size, seq_len, rank=0, world_size=1):
        self.shards = [read_shard(p) for p in paths]
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        need = world_size * batch_size * seq_len + 1
        small = [p for p, s in zip(paths, self.shards) if len(s) < need]
        if small:
            raise UserError(f"{small[0]} holds fewer than the {need} tokens one step needs "
                            f"(world_size x batch_size x seq_len + 1): use more data or smaller batches")
        self.shard, self.pos, self.epoch = 0, 0, 0

    def next_batch(self):
        span = self.world_size * self.B * self.T
        if self.pos + span + 1 > len(self.shards[self.shard]):
            self.shard, self.pos = (self.shard + 1) % len(self.shards), 0
            self.epoch += self.shard == 0
        start = self.pos + self.rank * self.B * self.T
        chunk = np.asarray(self.shards[self.shard][start:start + self.B * self.T + 1], dtype=np.int64)
        self.pos += span
        chunk = torch.from_numpy(chunk)
        return chunk[:-1].view(self.B, self.T), chunk[1:].view(self.B, self.T)

    def state_dict(self):
        return {"shard": self.shard, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.shard, self.pos, self.epoch = state["shard"], state["pos"], state["epoch"]


# ----- image-text data (stage 2) -----
# An example is {"images": [image, ...], "turns": [(user text, assistant text), ...]}, where an image
# is an (H, W, 3) uint8 array, a file path or a TarImage, read only when the example is used.
# The built-in world's examples come from eval_sim.py through train_vlm.py (a function of the
# index). User data, one example per JSONL line or per basename in a .tar shard (WebDataset):
#   {"image": "cat.jpg", "text": "a cat on a mat"}                  a caption (asked with CAPTION_PROMPT)
#   {"image": "cat.jpg", "conversations": [{"from": "human", "value": "<image>\nwhat animal?"},
#                                          {"from": "gpt", "value": "a cat"}, ...]}     LLaVA style
#   shard.tar: cat.jpg + cat.json (the same fields, minus "image") or cat.txt (a caption)
# JSONL image paths are relative to the JSONL file. The image goes at the start of the first user
# turn (an "<image>" marker in the text is dropped).

CAPTION_PROMPT = "describe the image."
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif")
CHAT_TOKENS = ("<|endoftext|>", "<|pad|>", "<|image|>", "<|user|>", "<|assistant|>")  # what stage 2 needs


def add_special_tokens(tokenizer, names):
    """The tokenizer with any of `names` it lacks appended after its highest id (a user's stage-1
    tokenizer may predate them); the caller grows the embedding to match."""
    missing = [n for n in names if n not in tokenizer.special_ids]
    if not missing:
        return tokenizer
    start = tokenizer.n_vocab
    return Tokenizer(tokenizer.ranks, tokenizer.pattern,
                     {**tokenizer.special_tokens, **{n: start + i for i, n in enumerate(missing)}},
                     tokenizer.roles, tokenizer.nfc)


class TarImage:
    """An image file inside an uncompressed .tar, read by its byte offset (no archive scan per read)."""

    def __init__(self, tar_path, name, offset, size):
        self.tar_path, self.name, self.offset, self.size = tar_path, name, offset, size

    def __str__(self):
        return f"{self.tar_path}:{self.name}"

    def read(self):
        with open(self.tar_path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def _example_from_record(record, where, image):
    """A JSONL line or a .tar sample's JSON -> an example; `where` names it in errors."""
    if isinstance(record.get("text"), str):
        return {"images": [image], "turns": [(CAPTION_PROMPT, record["text"])]}
    conv = record.get("conversations")
    try:
        assert isinstance(conv, list) and conv and len(conv) % 2 == 0
        turns = []
        for user, assistant in zip(conv[0::2], conv[1::2]):
            assert user["from"] in ("human", "user") and assistant["from"] in ("gpt", "assistant")
            assert isinstance(user["value"], str) and isinstance(assistant["value"], str)
            turns.append((user["value"].replace("<image>", "").strip(), assistant["value"]))
    except (AssertionError, KeyError, TypeError):
        raise UserError(f"{where}: expected a string 'text' (a caption) or 'conversations': a list of "
                        f"{{'from': 'human'|'gpt', 'value': str}} turns alternating, human first") from None
    return {"images": [image], "turns": turns}


def read_image_text_jsonl(path):
    """Examples from a JSONL file of {"image": path, "text" | "conversations": ...} lines."""
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    examples, base = [], os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{where}: not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise UserError(f"{where}: expected a JSON object with a string 'image' path")
            examples.append(_example_from_record(record, where, os.path.join(base, record["image"])))
    if not examples:
        raise UserError(f"data file holds no examples: {path}")
    return examples


def read_image_text_tar(path):
    """Examples from a WebDataset-style shard: files grouped by basename (the name up to its first
    dot), each group an image plus a .json record or a .txt caption. Uncompressed .tar only: the
    images stay in the file and are read by offset."""
    import tarfile
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    groups = {}  # key -> {extension: member}, in archive order
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    folder, _, filename = m.name.rpartition("/")
                    stem, _, ext = filename.partition(".")
                    groups.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = m
            examples = []
            for key, files in groups.items():
                image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
                if image_ext is None or not {"json", "txt"} & files.keys():
                    raise UserError(f"{path}: sample {key!r} needs an image ({', '.join(IMAGE_EXTENSIONS)}) "
                                    f"and a .json or .txt, has {sorted(files)}")
                m = files[image_ext]
                image = TarImage(path, m.name, m.offset_data, m.size)
                where = f"{path}:{key}"
                if "json" in files:
                    try:
                        record = json.loads(tar.extractfile(files["json"]).read())
                        assert isinstance(record, dict)
                    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
                        raise UserError(f"{where}.json: not a JSON object") from None
                else:
                    record = {"text": tar.extractfile(files["txt"]).read().decode("utf-8", "replace").strip()}
                examples.append(_example_from_record(record, where, image))
    except tarfile.TarError as e:
        raise UserError(f"{path} is not an uncompressed .tar shard: {e}") from None
    if not examples:
        raise UserError(f"data file holds no examples: {path}")
    return examples


def read_image_text(paths):
    """Examples from .jsonl files and .tar shards, in order."""
    examples = []
    for path in paths:
        if path.endswith(".jsonl"):
            examples += read_image_text_jsonl(path)
        elif path.endswith(".tar"):
            examples += read_image_text_tar(path)
        else:
            raise UserError(f"unsupported image-text file {path}: expected .jsonl or .tar")
    return examples


def load_image(image):
    """An (H, W, 3) uint8 array from an array, a file path or a TarImage; unreadable -> UserError."""
    if isinstance(image, np.ndarray):
        return image
    import io
    from PIL import Image
    try:
        with Image.open(io.BytesIO(image.read()) if isinstance(image, TarImage) else image) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as e:  # missing, truncated, not an image, decompression bomb: all a bad file
        raise UserError(f"cannot read image {image}: {e}") from None


def preprocess_image(image, size, rng=None):
    """uint8 (H, W, 3) -> float (3, size, size) in [0, 1] (the vision tower standardizes): resized
    so its longer side is `size` (aspect kept) and centred on a mid-grey square. rng: light
    augmentation, brightness and contrast jitter of up to 10%; no flips or crops, because left/right
    and positions are what the questions ask about."""
    if image.shape[:2] != (size, size):
        image = resize_longer_side(image, size)
    h, w = image.shape[:2]
    x = torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1).float() / 255  # (3, h, w)
    if rng is not None:
        brightness, contrast = rng.uniform(0.9, 1.1, size=2)
        x = ((x - x.mean()) * contrast + x.mean() * brightness).clamp(0, 1)
    out = torch.full((3, size, size), 0.5)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top:top + h, left:left + w] = x
    return out


def resize_longer_side(image, size):
    """uint8 (H, W, 3) -> (h, w, 3) with max(h, w) = size, aspect kept, bicubic (preprocess_image's first step)."""
    H, W = image.shape[:2]
    scale = size / max(H, W)
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    if (h, w) == (H, W):
        return image
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


def letterbox(image, size):
    """uint8 (H, W, 3) -> (size, size, 3): resize_longer_side, centred on grey 128, as preprocess_image does."""
    image = resize_longer_side(image, size)
    h, w = image.shape[:2]
    out = np.full((size, size, 3), 128, np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top:top + h, left:left + w] = image
    return out


def image_channel_stats(images):
    """Per-channel mean and std of preprocessed images [(3, H, W)]: the vision tower's standardization."""
    x = torch.stack(list(images)).transpose(0, 1).reshape(3, -1)
    return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()


def encode_chat(tokenizer, turns, n_image_tokens, max_len=None):
    """The chat template -> (ids, loss_mask), lists of equal length:

        <|endoftext|> <|user|> <|image|> x n_image_tokens ␣question <|assistant|> ␣answer <|endoftext|>
                      <|user|> ␣question 2 <|assistant|> ␣answer 2 <|endoftext|> ...

    n_image_tokens = images x visual tokens per image, all in the first turn (inside the model's image
    markers if a pretrained tokenizer has them: Tokenizer.image_placeholders). loss_mask marks the
    tokens the model learns to predict: each answer and its closing <|endoftext|>. A last turn with
    answer None ends at <|assistant|>: a prompt for generation. With max_len, turns that do not fit
    whole are dropped (the first is cut instead)."""
    eot, user, assistant = (tokenizer.special(s) for s in ("<|endoftext|>", "<|user|>", "<|assistant|>"))
    ids, mask = [eot], [False]
    for k, (question, answer) in enumerate(turns):
        prompt = [user] + tokenizer.image_placeholders(n_image_tokens if k == 0 else 0) + \
                 tokenizer.encode(" " + question) + [assistant]
        reply = [] if answer is None else tokenizer.encode(" " + answer) + [eot]
        if k > 0 and max_len and len(ids) + len(prompt) + len(reply) > max_len:
            break
        ids += prompt + reply
        mask += [False] * len(prompt) + [True] * len(reply)
    if max_len and len(ids) > max_len:
        if 2 + n_image_tokens >= max_len:
            raise UserError(f"seq_len {max_len} leaves no room for text after {n_image_tokens} image tokens")
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


class ImageTextLoader:
    """Batches (idx (B, T), targets (B, T), images (B, n_images, 3, S, S), labels) of chat sequences;
    labels (B, n_images, k) floats where every example has "labels" (per image, e.g. the built-in world's
    scene facts), else None.

    examples: a list, or a function index -> example with num_examples (the built-in world renders
    scenes on demand). Each epoch visits the examples in a fresh order seeded by (seed, epoch); all
    ranks step through that one order in lockstep, rank r taking the r-th slice of every
    world_size * B examples, so ranks never share data and one process with grad_accum = n sees the
    data of n processes. targets are the next tokens where loss_mask says so, else -1. Rows are
    padded with <|pad|> to the longest, rounded up to a multiple of pad_multiple (32: few shapes to compile;
    8 where nothing is compiled: fewer wasted tokens).
    An unreadable image is a UserError naming it; with skip_bad the next example takes its place
    and it is counted in `skipped`. The position is the resumable state (state_dict)."""

    def __init__(self, examples, tokenizer, batch_size, seq_len, image_size, n_visual_tokens, rank=0,
                 world_size=1, num_examples=None, shuffle=True, seed=0, augment=False, skip_bad=False, pad_multiple=32):
        self.examples, self.tokenizer, self.pad_multiple = examples, tokenizer, pad_multiple
        self.n = len(examples) if num_examples is None else num_examples
        self.B, self.seq_len, self.image_size, self.n_visual_tokens = batch_size, seq_len, image_size, n_visual_tokens
        self.rank, self.world_size, self.shuffle, self.seed = rank, world_size, shuffle, seed
        self.augment, self.skip_bad = augment, skip_bad
        if self.n < world_size * batch_size:
            raise UserError(f"{self.n} examples are fewer than one step's world_size x batch_size = "
                            f"{world_size * batch_size}: use more data or smaller batches")
        self.epoch, self.pos, self.bad = 0, 0, set()
        self._order_epoch, self._order = None, None

    @property
    def skipped(self):
        return len(self.bad)

    def order(self):
        if self._order_epoch != self.epoch:
            self._order_epoch = self.epoch
            self._order = (np.random.default_rng((self.seed, self.epoch)).permutation(self.n) if self.shuffle
                           else np.arange(self.n))
        return self._order

    def example(self, i):
        return self.examples(i) if callable(self.examples) else self.examples[i]

    def load(self, i):
        """Example i -> (ids, loss_mask, images (n_images, 3, S, S), labels or None); with skip_bad, the
        first readable example from i on."""
        for j in (k % self.n for k in range(i, i + self.n)):
            if j in self.bad:
                continue
            ex = self.example(j)
            try:
                pixels = [load_image(im) for im in ex["images"]]
            except UserError:
                if not self.skip_bad:
                    raise
                self.bad.add(j)
                continue
            rng = np.random.default_rng((self.seed, self.epoch, j)) if self.augment else None
            images = torch.stack([preprocess_image(p, self.image_size, rng) for p in pixels]) if pixels else \
                torch.zeros(0, 3, self.image_size, self.image_size)
            ids, mask = encode_chat(self.tokenizer, ex["turns"], len(pixels) * self.n_visual_tokens, self.seq_len + 1)
            return ids, mask, images, ex.get("labels")
        raise UserError(f"no readable image in any of the {self.n} examples")

    def next_batch(self):
        span = self.world_size * self.B
        if self.pos + span > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        start = self.pos + self.rank * self.B
        rows = [self.load(int(i)) for i in self.order()[start:start + self.B]]
        self.pos += span
        return self.collate(rows)

    def collate(self, rows):
        """[(ids, loss_mask, images, labels)] -> padded (idx, targets, images, labels); input = ids[:-1], targets = ids[1:]."""
        if len({r[2].size(0) for r in rows}) > 1:
            raise UserError("examples in one batch have different numbers of images; give every example the same number")
        T = min(-(-max(len(r[0]) - 1 for r in rows) // self.pad_multiple) * self.pad_multiple, self.seq_len)
        idx = torch.full((len(rows), T), self.tokenizer.special("<|pad|>"), dtype=torch.long)
        targets = torch.full((len(rows), T), -1, dtype=torch.long)
        for b, (ids, mask, *_) in enumerate(rows):
            ids, mask = torch.tensor(ids), torch.tensor(mask)
            n = len(ids) - 1
            idx[b, :n] = ids[:-1]
            targets[b, :n] = torch.where(mask[1:], ids[1:], -1)
        labels = torch.tensor([r[3] for r in rows]) if all(r[3] is not None for r in rows) else None
        return idx, targets, torch.stack([r[2] for r in rows]), labels

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "bad": sorted(self.bad)}

    def load_state_dict(self, state):
        self.epoch, self.pos, self.bad = state["epoch"], state["pos"], set(state["bad"])


# ----- robot episodes (written by eval_sim.py collect, read by train_vla.py) -----
# A dataset is a directory (format "nanofoundry-episodes-v1"):
#   meta.json        {"format", "cameras", "image_size": [H, W], "state_names", "action_names", "fps", ...}
#   episodes.jsonl   one line per episode: {"file", "length", "task", "instruction", "success", ...}
#   episodes/episode_000000.npz   images_<camera> (T, H, W, 3) uint8, state (T, S) float32,
#                                 action (T, A) float32; frame t = what was seen before action t
#   stats.json       {"state": {...}, "action": {...}}: mean, std, min, max, q01, q99 per dimension
# From a real robot log: w = EpisodeWriter(root, cameras, image_size, state_names, action_names,
# fps); per episode w.add({"scene": (T,H,W,3) uint8, ...}, states, actions, instruction, task);
# w.close() writes the index, metadata and statistics.

EPISODE_FORMAT = "nanofoundry-episodes-v1"


def episode_stats(x):
    """Per-dimension statistics of an (N, D) array, as stored in stats.json."""
    x = np.asarray(x, np.float64)
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "min": x.min(0).tolist(),
            "max": x.max(0).tolist(), "q01": np.quantile(x, 0.01, axis=0).tolist(),
            "q99": np.quantile(x, 0.99, axis=0).tolist()}


class EpisodeWriter:
    """Writes episodes one at a time; close() writes episodes.jsonl, meta.json and stats.json."""

    def __init__(self, root, cameras, image_size, state_names, action_names, fps, extra=None):
        os.makedirs(os.path.join(root, "episodes"), exist_ok=True)
        size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
        self.root, self.cameras = root, list(cameras)
        self.meta = {"format": EPISODE_FORMAT, "cameras": self.cameras, "image_size": size,
                     "state_names": list(state_names), "action_names": list(action_names),
                     "fps": fps, **(extra or {})}
        self.lines, self.states, self.actions = [], [], []

    @property
    def num_episodes(self):
        return len(self.lines)

    def add(self, images, state, action, instruction, task, success=True, **extra):
        state, action = np.asarray(state, np.float32), np.asarray(action, np.float32)
        T = len(action)
        H, W = self.meta["image_size"]
        episode = f"episode {len(self.lines)} ({task!r})"
        if state.shape != (T, len(self.meta["state_names"])) or action.shape != (T, len(self.meta["action_names"])):
            raise UserError(f"{episode}: state {state.shape} / action {action.shape} do not match "
                            f"{len(self.meta['state_names'])} state and {len(self.meta['action_names'])} action dims")
        for field, x in (("state", state), ("action", action)):
            check_finite(x, f"{episode}: {field}")
        for cam in self.cameras:
            if images[cam].shape != (T, H, W, 3) or images[cam].dtype != np.uint8:
                raise UserError(f"{episode}, camera {cam}: expected ({T}, {H}, {W}, 3) uint8, got "
                                f"{images[cam].shape} {images[cam].dtype}")
        name = f"episodes/episode_{len(self.lines):06d}.npz"
        write_durably(os.path.join(self.root, name), lambda f: np.savez_compressed(
            f, state=state, action=action, **{f"images_{cam}": images[cam] for cam in self.cameras}), "wb")
        self.lines.append({"file": name, "length": T, "task": task, "instruction": instruction,
                           "success": bool(success), **extra})
        self.states.append(state)
        self.actions.append(action)

    def close(self):
        """The index and statistics, then meta.json last: a dataset with meta.json is complete."""
        write_durably(os.path.join(self.root, "episodes.jsonl"),
                      lambda f: f.writelines(json.dumps(line) + "\n" for line in self.lines))
        stats = {"state": episode_stats(np.concatenate(self.states)),
                 "action": episode_stats(np.concatenate(self.actions))}
        write_durably(os.path.join(self.root, "stats.json"), lambda f: json.dump(stats, f, indent=1))
        self.meta.update(num_episodes=len(self.lines), num_frames=sum(len(a) for a in self.actions))
        write_durably(os.path.join(self.root, "meta.json"), lambda f: json.dump(self.meta, f, indent=1))


def check_finite(x, what):
    """A UserError naming `what` and the first step (row) holding NaN or Inf."""
    bad = ~np.isfinite(x)
    if bad.any():
        t = int(np.argwhere(bad)[0][0])
        raise UserError(f"{what} holds NaN/Inf (first at step {t}: {np.asarray(x)[t].tolist()})")


def read_json(path, what):
    """A JSON object from path; missing, not JSON or not an object: a UserError naming the file."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found: is this an episode dataset (see eval_sim.py collect)?")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a valid {what}: {e}")
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a valid {what}: expected a JSON object")
    return obj


def check_episode_meta(root, meta, stats):
    """meta.json and stats.json agree on the widths: returns {"state": S, "action": A, "image": [H, W]}."""
    try:
        widths = {"state": len(meta["state_names"]), "action": len(meta["action_names"]),
                  "image": [int(x) for x in meta["image_size"]]}
        assert len(widths["image"]) == 2
    except (KeyError, TypeError, ValueError, AssertionError):
        raise UserError(f"{root}/meta.json: expected state_names, action_names and image_size [H, W]") from None
    for field in ("state", "action"):
        for key in ("mean", "std", "min", "max", "q01", "q99"):
            values = stats.get(field, {}).get(key) if isinstance(stats.get(field), dict) else None
            if not (isinstance(values, list) and len(values) == widths[field]
                    and all(isinstance(v, (int, float)) for v in values)):
                raise UserError(f"{root}/stats.json: {field}.{key} should list {widths[field]} values "
                                f"(meta.json's {field}_names)")
            check_finite(np.asarray(values, np.float64)[None], f"{root}/stats.json: {field}.{key}")
    return widths


def check_episode(path, ep, widths, cameras):
    """An episode's arrays against meta.json's widths and image size, and finite."""
    T, (H, W) = len(ep["action"]), widths["image"]
    for field, x in (("state", ep["state"]), ("action", ep["action"])):
        if x.shape != (T, widths[field]):
            raise UserError(f"{path}: {field} has shape {x.shape}, expected ({T}, {widths[field]}) "
                            f"(meta.json: {widths[field]} {field}_names)")
        check_finite(x, f"{path}: {field}")
    for camera, images in zip(cameras, ep["images"]):
        if images.shape != (T, H, W, 3) or images.dtype != np.uint8:
            raise UserError(f"{path}: images_{camera} has shape {images.shape} {images.dtype}, expected "
                            f"({T}, {H}, {W}, 3) uint8 (meta.json image_size {[H, W]})")


class EpisodeDataset:
    """Samples (past frames, future action chunk) windows from every step of every episode.

    item = {"images": (n_cam, n_frames, H, W, 3) uint8, "state": (n_frames, S) float32,
            "actions": (chunk_size, A) float32, "action_mask": (chunk_size,) bool,
            "instruction": str, "task": str}
    Past frames before the episode start repeat the first frame; actions after the episode end
    repeat the last action with action_mask False. root: our episode directory, or
    'lerobot:DIR' for a LeRobotDataset (read_lerobot: its frames are decoded once, at image_size,
    into frame_cache). Either way self.episodes holds per episode {"images": [(T, H, W, 3) per
    camera], "state" (T, S), "action" (T, A), "instruction", "task", "length"}: states and actions
    in memory, LeRobot frames memory-mapped."""

    def __init__(self, root, n_frames=1, chunk_size=8, cameras=("scene", "wrist"), episode_ids=None, frame_stride=1,
                 image_size=None, frame_cache="out/frames"):
        self.n_frames, self.chunk_size, self.cameras = n_frames, chunk_size, tuple(cameras)
        self.frame_stride = frame_stride  # steps between past frames (a policy re-planning every k steps sees every k-th)
        if root.startswith("lerobot:"):
            self.meta, self.stats, episodes = read_lerobot(root[len("lerobot:"):], self.cameras, image_size, frame_cache)
            episodes = episodes if episode_ids is None else [episodes[e] for e in episode_ids]
        else:
            self.meta, self.stats, episodes = read_episodes(root, self.cameras, episode_ids)
        self._set_episodes(episodes)

    def _set_episodes(self, episodes):
        self.episodes = episodes
        self.index = [(e, t) for e, ep in enumerate(episodes) for t in range(ep["length"])]

    def subset(self, episode_ids):
        """The same dataset restricted to some episodes (a train/validation split read once)."""
        part = copy.copy(self)
        part._set_episodes([self.episodes[e] for e in episode_ids])
        return part

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        e, t = self.index[i]
        ep = self.episodes[e]
        past = np.clip(np.arange(t - (self.n_frames - 1) * self.frame_stride, t + 1, self.frame_stride), 0, None)
        future = np.arange(t, t + self.chunk_size)
        return {"images": torch.from_numpy(np.stack([frames[past] for frames in ep["images"]])),
                "state": torch.from_numpy(ep["state"][past]),
                "actions": torch.from_numpy(ep["action"][np.minimum(future, ep["length"] - 1)]),
                "action_mask": torch.from_numpy(future < ep["length"]),
                "instruction": ep["instruction"], "task": ep["task"]}


def read_episodes(root, cameras, episode_ids=None):
    """(meta, stats, episodes) of our episode directory (all episodes, or those of episode_ids),
    every episode checked against meta.json's widths and image size, and for NaN/Inf."""
    meta = read_json(os.path.join(root, "meta.json"), "dataset metadata file")
    stats = read_json(os.path.join(root, "stats.json"), "statistics file")
    missing = [c for c in cameras if c not in meta.get("cameras", [])]
    if missing:
        raise UserError(f"{root} has cameras {meta.get('cameras')}, not {missing}")
    widths = check_episode_meta(root, meta, stats)
    lines = read_jsonl(os.path.join(root, "episodes.jsonl"), "episode index")
    if not all(isinstance(line.get("file"), str) for line in lines):
        raise UserError(f"{root}/episodes.jsonl: every line needs the episode's 'file'")
    if len(lines) != meta.get("num_episodes", len(lines)):
        raise UserError(f"{root}/episodes.jsonl lists {len(lines)} episodes, meta.json says {meta['num_episodes']}")
    episodes = []
    for e in range(len(lines)) if episode_ids is None else episode_ids:
        line = lines[e]
        try:
            with np.load(os.path.join(root, line["file"])) as z:
                ep = {"images": [z[f"images_{c}"] for c in cameras], "state": z["state"], "action": z["action"]}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:  # (no pickles: allow_pickle off)
            raise UserError(f"episode {line.get('file')} in {root} is unreadable: {err}")
        check_episode(os.path.join(root, line["file"]), ep, widths, cameras)
        ep.update(instruction=str(line.get("instruction", "")), task=str(line.get("task", "")),
                  length=len(ep["action"]))
        episodes.append(ep)
    return meta, stats, episodes


# ----- LeRobotDataset v2.1 / v3.0 (a local directory), read into the same per-episode arrays
#   v2.1: meta/info.json, meta/episodes.jsonl, meta/tasks.jsonl, meta/episodes_stats.jsonl,
#         data/chunk-000/episode_000000.parquet, videos/chunk-000/<camera key>/episode_000000.mp4
#   v3.0: meta/info.json, meta/tasks.parquet, meta/stats.json, meta/episodes/chunk-000/file-000.parquet
#         (per episode: length, tasks, its data file, its video files and from/to timestamps there);
#         many episodes per data/chunk-000/file-000.parquet and per videos/<camera key>/chunk-000/file-000.mp4
# Cameras are the observation.images.* features (--cameras=top or observation.images.top), as video
# or as images in the parquet; state observation.state, action action, instruction the episode's
# task; names and statistics from the dataset's metadata. A row's frame is the video frame at
# (from_timestamp + timestamp) * fps. Frames are decoded once, letterboxed to the model's resolution
# as preprocess_image would, into a cache: one (rows, S, S, 3) uint8 .npy per camera in row order,
# memory-mapped.

LEROBOT_INSTALL = "pip install pyarrow av"


def lerobot_module(name):
    """pyarrow.parquet or av, imported on first use with a one-line message when missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"reading LeRobot datasets needs {name.split('.')[0]} (parquet and video): "
                        f"{LEROBOT_INSTALL}") from None


def read_lerobot(root, cameras, image_size=None, cache_dir="out/frames"):
    """(meta, stats, episodes) of a LeRobotDataset directory, the episodes as EpisodeDataset holds
    them. image_size: frames letterboxed to image_size x image_size (None: as stored)."""
    pq = lerobot_module("pyarrow.parquet")
    info_path = os.path.join(root, "meta", "info.json")
    if not os.path.isfile(info_path):
        raise UserError(f"{info_path} not found: expected a LeRobotDataset v2.1 or v3.0 directory")
    info = read_json(info_path, "LeRobot info file")
    version, features, fps = info.get("codebase_version"), info.get("features"), info.get("fps")
    if version not in ("v2.0", "v2.1", "v3.0") or not isinstance(features, dict) or not fps:
        raise UserError(f"{info_path}: expected codebase_version v2.1 or v3.0, a 'features' map and 'fps'")
    for key in ("observation.state", "action"):
        if len(features.get(key, {}).get("shape", [])) != 1:
            raise UserError(f"{info_path}: expected a 1-D feature {key!r}; features are {sorted(features)}")
    available = [k for k in features if k.startswith("observation.images.")]
    keys = []
    for cam in cameras:
        key = cam if cam in available else f"observation.images.{cam}"
        if key not in available:
            raise UserError(f"{info_path} has no camera {cam!r}: its cameras are {available}")
        keys.append(key)
    v3 = version == "v3.0"
    tasks = lerobot_task_table(root, v3)
    image_keys = [k for k in keys if features[k].get("dtype") == "image"]
    files, episodes, sources, offset = {}, [], [], 0
    for m in lerobot_episode_table(root, v3, keys):
        e = int(m["episode_index"])
        chunk = e // info.get("chunks_size", 1000)
        data_path = os.path.join(root, info["data_path"].format(
            chunk_index=m.get("data/chunk_index", 0), file_index=m.get("data/file_index", 0),
            episode_chunk=chunk, episode_index=e))
        if data_path not in files:
            files[data_path] = lerobot_rows(pq, data_path)
        rows, order, sorted_episodes = files[data_path]
        sel = order[np.searchsorted(sorted_episodes, e, "left"):np.searchsorted(sorted_episodes, e, "right")]
        if len(sel) != m["length"]:
            raise UserError(f"{data_path} holds {len(sel)} rows of episode {e}, but the episode metadata says "
                            f"length {m['length']}")
        task_index = int(rows["task_index"][sel[0]])
        if task_index not in tasks:
            raise UserError(f"episode {e} in {data_path} has task_index {task_index}, which the tasks file of "
                            f"{root}/meta does not list (it has {sorted(tasks)[:10]})")
        for key in ("observation.state", "action"):
            if rows[key].shape[1] != features[key]["shape"][0]:
                raise UserError(f"{data_path}: {key} has {rows[key].shape[1]} values per row, "
                                f"{info_path} says {features[key]['shape'][0]}")
            check_finite(rows[key][sel], f"{data_path}: episode {e}'s {key}")
        episodes.append({"state": rows["observation.state"][sel], "action": rows["action"][sel], "length": len(sel),
                         "instruction": tasks[task_index], "task": tasks[task_index]})
        # where each camera's frames are: (video file, the episode's start in it) or the parquet's images
        videos = {k: (os.path.join(root, info["video_path"].format(
            video_key=k, chunk_index=m.get(f"videos/{k}/chunk_index", 0), file_index=m.get(f"videos/{k}/file_index", 0),
            episode_chunk=chunk, episode_index=e)), float(m.get(f"videos/{k}/from_timestamp", 0.0)))
            for k in keys if k not in image_keys}
        sources.append({"episode": e, "data_path": data_path, "rows": sel, "offset": offset, "length": len(sel),
                        "timestamp": rows["timestamp"][sel], "videos": videos})
        offset += len(sel)
    frames = [lerobot_frames(root, key, features[key], sources, fps, image_size, cache_dir) for key in keys]
    if len({f.shape[1:] for f in frames}) > 1:
        raise UserError(f"{info_path}: cameras {keys} differ in size {[f.shape[1:3] for f in frames]}; read them at one "
                        f"image_size (train_vla.py does: the model's resolution)")
    for ep, src in zip(episodes, sources):
        ep["images"] = [f[src["offset"]:src["offset"] + src["length"]] for f in frames]  # memory-mapped views
    names = lambda key: lerobot_names(features[key], key)
    meta = {"format": f"lerobot-{version}", "cameras": list(cameras), "camera_keys": keys,
            "image_size": list(frames[0].shape[1:3]) if frames else [0, 0], "state_names": names("observation.state"),
            "action_names": names("action"), "fps": fps, "num_episodes": len(episodes), "num_frames": offset}
    return meta, lerobot_stats(root, v3, episodes, features), episodes


def lerobot_episode_table(root, v3, keys):
    """Per-episode metadata rows (episode_index, length, and in v3.0 the file indices and timestamps)."""
    if not v3:
        path = os.path.join(root, "meta", "episodes.jsonl")
        rows = read_jsonl(path, "LeRobot v2.1 episode table")
        need = ["episode_index", "length"]
    else:
        pq = lerobot_module("pyarrow.parquet")
        paths = sorted(glob.glob(os.path.join(root, "meta", "episodes", "*", "*.parquet")))
        path = os.path.join(root, "meta", "episodes", "chunk-XXX", "file-XXX.parquet")
        if not paths:
            raise UserError(f"{path} not found: a v3.0 dataset lists its episodes there")
        rows = [r for p in paths for r in read_parquet(pq, p).to_pylist()]
        need = ["episode_index", "length", "data/chunk_index", "data/file_index"] + \
            [f"videos/{k}/{f}" for k in keys for f in ("chunk_index", "file_index", "from_timestamp")]
    for r in rows:
        missing = [k for k in need if k not in r]
        if missing:
            raise UserError(f"{path}: episode {r.get('episode_index', '?')} lacks {missing}; expected {need}")
    if not rows:
        raise UserError(f"{path} lists no episodes")
    return sorted(rows, key=lambda r: r["episode_index"])


def lerobot_task_table(root, v3):
    """{task_index: task string} from meta/tasks.jsonl (v2.1) or meta/tasks.parquet (v3.0)."""
    if not v3:
        path = os.path.join(root, "meta", "tasks.jsonl")
        rows = read_jsonl(path, "LeRobot v2.1 task table")
    else:
        path = os.path.join(root, "meta", "tasks.parquet")
        table = read_parquet(lerobot_module("pyarrow.parquet"), path)
        # written by pandas with the task strings as the index: a column 'task' or '__index_level_0__'
        columns = table.column_names
        text = next((c for c in ("task", "__index_level_0__") if c in columns), None)
        rows = [] if text is None or "task_index" not in columns else \
            [{"task_index": i, "task": t} for i, t in zip(table.column("task_index").to_pylist(), table.column(text).to_pylist())]
    try:
        tasks = {int(r["task_index"]): str(r["task"]) for r in rows}
    except (KeyError, TypeError, ValueError):
        tasks = {}
    if not tasks:
        raise UserError(f"{path}: expected task_index and task for every task")
    return tasks


def read_jsonl(path, what="dataset index"):
    """The JSON objects of a .jsonl file, one per non-empty line; anything else: a UserError naming the line."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: the {what} is missing")
    rows = []
    try:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
                    if not isinstance(rows[-1], dict):
                        raise ValueError
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise UserError(f"{path}:{lineno}: expected one JSON object per line ({what})") from None
    return rows


def read_parquet(pq, path, columns=None):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: the dataset's metadata points there")
    try:
        return pq.read_table(path, columns=columns)
    except Exception as e:  # pyarrow raises ArrowInvalid, KeyError, OSError...: all say "not our file"
        raise UserError(f"{path} is not a readable parquet file with columns {columns or 'any'}: "
                        f"{str(e).splitlines()[0][:200]}") from None


def lerobot_rows(pq, path):
    """The columns we use of one data parquet file, as numpy arrays, and the row order by episode and
    timestamp with the episode of each row in that order. (Image columns are read only to fill the
    frame cache.)"""
    columns = ["episode_index", "timestamp", "task_index", "observation.state", "action"]
    table = read_parquet(pq, path, columns)
    out = {}
    for name in columns:
        column = table.column(name).combine_chunks()
        if name in ("observation.state", "action"):
            values = np.asarray(column.flatten(), np.float32)
            if len(values) % max(1, len(column)):
                raise UserError(f"{path}: {name} rows have different lengths")
            out[name] = values.reshape(len(column), -1)
        else:
            out[name] = np.asarray(column.to_numpy(zero_copy_only=False))
    order = np.lexsort((out["timestamp"], out["episode_index"]))  # by episode, then time
    return out, order, out["episode_index"][order]


def lerobot_names(feature, key):
    names = feature.get("names")
    if isinstance(names, dict):  # e.g. {"motors": [...]}
        names = [n for group in names.values() for n in (group if isinstance(group, list) else [group])]
    if not isinstance(names, list) or len(names) != feature["shape"][0]:
        names = [f"{key}_{i}" for i in range(feature["shape"][0])]
    return [str(n) for n in names]


def lerobot_stats(root, v3, episodes, features):
    """{"state", "action"}: mean, std, min, max from meta/stats.json, or (v2.1) aggregated over
    meta/episodes_stats.jsonl weighted by each episode's count; q01/q99 from the metadata when it has
    them, else computed from the rows."""
    path = os.path.join(root, "meta", "stats.json")
    if os.path.isfile(path):
        stats = read_json(path, "LeRobot statistics file")
    elif not v3:
        path = os.path.join(root, "meta", "episodes_stats.jsonl")
        per_episode = [r.get("stats", {}) for r in read_jsonl(path, "LeRobot v2.1 episode statistics")]
        stats = {key: aggregate_stats([s[key] for s in per_episode if key in s]) for key in ("observation.state", "action")
                 if all(key in s and {"mean", "std", "min", "max", "count"} <= set(s[key]) for s in per_episode)}
    else:
        raise UserError(f"{path} not found: a v3.0 dataset keeps its statistics there")
    out = {}
    for name, key in (("state", "observation.state"), ("action", "action")):
        dims = features[key]["shape"][0]
        entry = stats.get(key, {}) if isinstance(stats, dict) else {}
        try:
            out[name] = {k: np.asarray(entry[k], np.float64).reshape(dims).tolist() for k in ("mean", "std", "min", "max")}
        except (KeyError, ValueError, TypeError):
            raise UserError(f"{path}: expected mean, std, min and max of {key} with {dims} values each "
                            f"(for every episode)") from None
        rows = np.concatenate([ep[name] for ep in episodes])
        for q, p in (("q01", 0.01), ("q99", 0.99)):
            out[name][q] = np.asarray(entry[q], np.float64).reshape(dims).tolist() if q in entry else \
                np.quantile(rows, p, axis=0).tolist()
    return out


def aggregate_stats(parts):
    """Per-episode {mean, std, min, max, count} -> the whole dataset's (LeRobot's pooled variance)."""
    n = np.array([np.asarray(p["count"]).reshape(-1)[0] for p in parts], np.float64)[:, None]
    means, stds = (np.array([np.asarray(p[k], np.float64).reshape(-1) for p in parts]) for k in ("mean", "std"))
    mean = (n * means).sum(0) / n.sum()
    var = (n * (stds ** 2 + (means - mean) ** 2)).sum(0) / n.sum()
    return {"mean": mean.tolist(), "std": np.sqrt(var).tolist(), "count": [int(n.sum())],
            "min": np.min([np.asarray(p["min"]).reshape(-1) for p in parts], 0).tolist(),
            "max": np.max([np.asarray(p["max"]).reshape(-1) for p in parts], 0).tolist()}


def lerobot_frames(root, key, feature, sources, fps, image_size, cache_dir):
    """(rows, h, w, 3) uint8, memory-mapped: camera `key`'s frame of every row of the episodes in
    `sources` (read_lerobot's: where each episode's frames are), letterboxed to image_size x
    image_size (or as stored), from the cache or decoded once into it. The cache file is named by a
    hash of the dataset, camera, size and the sizes and times of the files read: a changed dataset
    is decoded anew."""
    shape = feature.get("shape", [])
    if len(shape) != 3:
        raise UserError(f"{root}/meta/info.json: camera {key} needs a shape [height, width, 3]")
    H, W = (shape[1], shape[2]) if shape[0] == 3 and shape[2] != 3 else (shape[0], shape[1])
    h, w = (image_size, image_size) if image_size else (H, W)
    n_rows = sum(src["length"] for src in sources)
    stamp = [os.path.abspath(root), key, h, w, n_rows]
    for p in sorted({src["videos"][key][0] for src in sources if key in src["videos"]} |
                    {src["data_path"] for src in sources} | {os.path.join(root, "meta", "info.json")}):
        st = os.stat(p) if os.path.exists(p) else None
        stamp.append((p, st and st.st_size, st and st.st_mtime_ns))
    digest = hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"{os.path.basename(os.path.abspath(root))}-{digest}", f"{key}-{h}x{w}.npy")
    if os.path.isfile(path):
        return np.load(path, mmap_mode="r")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # renamed when complete: a killed decode leaves no half cache
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n_rows, h, w, 3))
    if feature.get("dtype") == "image":  # encoded images in the data parquet: {"bytes": PNG/JPEG, "path"} per row
        from PIL import Image
        pq, column, column_of = lerobot_module("pyarrow.parquet"), None, None
        for src in sources:
            if column_of != src["data_path"]:
                column_of = src["data_path"]
                column = read_parquet(pq, column_of, [key]).column(key)
            for t, cell in enumerate(column.take(src["rows"]).to_pylist()):
                try:
                    image = Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else
                                       os.path.join(root, cell["path"])).convert("RGB")
                except Exception as e:
                    raise UserError(f"{src['data_path']}: camera {key}, row {t} of episode {src['episode']} is "
                                    f"not a readable image: {e}") from None
                out[src["offset"] + t] = fit_frame(np.asarray(image), image_size, h, w, src["data_path"])
    else:
        wanted = defaultdict(dict)  # video file -> {frame slot: [cache rows]}
        for src in sources:
            video, start = src["videos"][key]
            for t, slot in enumerate(np.round((start + src["timestamp"]) * fps).astype(int)):
                wanted[video].setdefault(int(slot), []).append(src["offset"] + t)
        for video, slots in wanted.items():
            decode_video_frames(video, slots, fps, out, image_size, h, w)
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def fit_frame(image, size, h, w, source):
    """A decoded frame as the cache stores it: letterboxed to size x size as preprocess_image would
    (padding 128 where it uses 0.5: 0.2% apart), or, with size None, as stored: (h, w) checked."""
    if size:
        return letterbox(image, size)
    if image.shape[:2] != (h, w):
        raise UserError(f"{source}: frames are {image.shape[1]}x{image.shape[0]}, meta/info.json says {w}x{h}")
    return image


def decode_video_frames(video, slots, fps, out, size, h, w):
    """Decode `video` in order once, writing the frame at each wanted slot (round(time * fps)) to
    its cache rows; frames past the last wanted slot are never decoded."""
    av = lerobot_module("av")
    if not os.path.isfile(video):
        raise UserError(f"{video} not found: the dataset's metadata points there for camera frames")
    need, last, n = dict(slots), max(slots), 0
    try:
        with av.open(video) as container:
            stream = container.streams.video[0]
            for n, frame in enumerate(container.decode(stream), 1):
                slot = round(frame.time * fps) if frame.time is not None else n - 1
                if slot in need:
                    out[need.pop(slot)] = fit_frame(frame.to_ndarray(format="rgb24"), size, h, w, video)
                if slot >= last:
                    break
    except av.error.FFmpegError as e:
        raise UserError(f"{video} is not a readable video: {e}") from None
    if need:
        first = min(need)
        raise UserError(f"{video} is shorter than its episodes: it has {n} frames, but rows need the frame at "
                        f"t = {first / fps:.3f} s and up to {last / fps:.3f} s ({fps} fps)")


def write_lerobot(src, dst, vcodec="libx264", crf=18):
    """Our episode directory -> a LeRobotDataset v3.0 directory (one data file, one video file per
    camera, each instruction a task). Read back with --demos=lerobot:DST --cameras=scene,wrist."""
    pq = lerobot_module("pyarrow.parquet")
    lerobot_module("av")  # missing extras fail before anything is written
    import pyarrow as pa
    ds = EpisodeDataset(src, cameras=read_json(os.path.join(src, "meta.json"), "dataset metadata file")["cameras"])
    meta, fps = ds.meta, ds.meta.get("fps", 10)
    keys = [f"observation.images.{c}" for c in ds.cameras]
    tasks = sorted({ep["instruction"] for ep in ds.episodes})
    columns, episode_rows, start = defaultdict(list), [], 0
    for e, ep in enumerate(ds.episodes):
        T = ep["length"]
        columns["observation.state"] += list(ep["state"])
        columns["action"] += list(ep["action"])
        columns["timestamp"] += list(np.arange(T, dtype=np.float32) / fps)
        columns["frame_index"] += list(range(T))
        columns["episode_index"] += [e] * T
        columns["index"] += list(range(start, start + T))
        columns["task_index"] += [tasks.index(ep["instruction"])] * T
        row = {"episode_index": e, "tasks": [ep["instruction"]], "length": T, "data/chunk_index": 0,
               "data/file_index": 0, "dataset_from_index": start, "dataset_to_index": start + T}
        for k in keys:
            row.update({f"videos/{k}/chunk_index": 0, f"videos/{k}/file_index": 0,
                        f"videos/{k}/from_timestamp": start / fps, f"videos/{k}/to_timestamp": (start + T) / fps})
        episode_rows.append(row)
        start += T
    S, A = len(meta["state_names"]), len(meta["action_names"])
    vectors = lambda name, dims: pa.FixedSizeListArray.from_arrays(np.asarray(columns[name], np.float32).reshape(-1), dims)
    table = {"observation.state": vectors("observation.state", S), "action": vectors("action", A),
             "timestamp": pa.array(columns["timestamp"], pa.float32()),
             **{k: pa.array(columns[k], pa.int64()) for k in ("frame_index", "episode_index", "index", "task_index")}}
    os.makedirs(os.path.join(dst, "data", "chunk-000"), exist_ok=True)
    pq.write_table(pa.table(table), os.path.join(dst, "data", "chunk-000", "file-000.parquet"))
    os.makedirs(os.path.join(dst, "meta", "episodes", "chunk-000"), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episode_rows),
                   os.path.join(dst, "meta", "episodes", "chunk-000", "file-000.parquet"))
    pq.write_table(pa.table({"task_index": list(range(len(tasks))), "task": tasks}),
                   os.path.join(dst, "meta", "tasks.parquet"))
    H, W = meta["image_size"]
    for c, k in zip(ds.cameras, keys):
        write_video(os.path.join(dst, "videos", k, "chunk-000", "file-000.mp4"),
                    np.concatenate([ep["images"][ds.cameras.index(c)] for ep in ds.episodes]), fps, vcodec, crf)
    with open(os.path.join(dst, "meta", "stats.json"), "w") as f:
        json.dump({"observation.state": {**ds.stats["state"], "count": [start]},
                   "action": {**ds.stats["action"], "count": [start]}}, f, indent=1)
    features = {"observation.state": {"dtype": "float32", "shape": [S], "names": meta["state_names"]},
                "action": {"dtype": "float32", "shape": [A], "names": meta["action_names"]},
                **{k: {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"],
                       "info": {"video.fps": fps, "video.codec": vcodec, "video.pix_fmt": "yuv420p"}} for k in keys},
                **{k: {"dtype": "float32" if k == "timestamp" else "int64", "shape": [1], "names": None}
                   for k in ("timestamp", "frame_index", "episode_index", "index", "task_index")}}
    info = {"codebase_version": "v3.0", "robot_type": meta.get("robot_type", "nanofoundry-tabletop"), "fps": fps,
            "total_episodes": len(ds.episodes), "total_frames": start, "total_tasks": len(tasks), "chunks_size": 1000,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4", "features": features}
    with open(os.path.join(dst, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return dst


def read_lerobot_into_episodes(src, dst, cameras, image_size=None, cache_dir="out/frames"):
    """A LeRobotDataset -> our episode directory (frames as read_lerobot gives them)."""
    meta, _, episodes = read_lerobot(src, cameras, image_size, cache_dir)
    w = EpisodeWriter(dst, cameras, meta["image_size"], meta["state_names"], meta["action_names"], meta["fps"],
                      {"source": os.path.abspath(src)})
    for ep in episodes:
        w.add(dict(zip(cameras, ep["images"])), ep["state"], ep["action"], ep["instruction"], ep["task"])
    w.close()
    return dst


def write_video(path, frames, fps, vcodec="libx264", crf=18):
    """(T, H, W, 3) uint8 -> an mp4 (yuv420p: H and W even) through PyAV."""
    av = lerobot_module("av")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream(vcodec, rate=fps, options={"crf": str(crf)} if vcodec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode())


class Normalizer:
    """Maps states or actions to a normalized range and back, from one stats.json entry.

    meanstd: (x - mean) / std; minmax: [min, max] -> [-1, 1]; quantile: [q01, q99] -> [-1, 1]
    (not clipped, so the round trip is exact). Works on numpy arrays and torch tensors."""

    def __init__(self, stats, mode="meanstd"):
        if mode not in ("meanstd", "minmax", "quantile"):
            raise UserError(f"normalization mode must be meanstd, minmax or quantile, got {mode!r}")
        self.stats, self.mode = {k: list(v) for k, v in stats.items()}, mode
        if mode == "meanstd":
            offset, scale = np.array(stats["mean"]), np.array(stats["std"])
        else:
            lo, hi = (np.array(stats["min"]), np.array(stats["max"])) if mode == "minmax" else \
                (np.array(stats["q01"]), np.array(stats["q99"]))
            offset, scale = (hi + lo) / 2, (hi - lo) / 2
        self.offset, self.scale = offset, np.where(scale < 1e-6, 1.0, scale)  # constant dims pass through

    def _params(self, x):
        if isinstance(x, torch.Tensor):
            return (torch.as_tensor(self.offset, dtype=x.dtype, device=x.device),
                    torch.as_tensor(self.scale, dtype=x.dtype, device=x.device))
        return self.offset.astype(np.asarray(x).dtype), self.scale.astype(np.asarray(x).dtype)

    def normalize(self, x):
        offset, scale = self._params(x)
        return (x - offset) / scale

    def unnormalize(self, x):
        offset, scale = self._params(x)
        return x * scale + offset

    def to_dict(self):
        return {"mode": self.mode, "stats": self.stats}

    @classmethod
    def from_dict(cls, d):
        return cls(d["stats"], d["mode"])


# ----- stage 3: policy inputs (prompts, batches, shuffled windows) -----

def vla_prompt(tokenizer, instruction, n_image_tokens, action_token=False):
    """Stage 2's chat template with the instruction as the question, ending at <|assistant|>:
        <|endoftext|> <|user|> <|image|> x n_image_tokens ␣instruction <|assistant|> [<|action|>]
    (<|action|> only for action_token conditioning: its hidden states condition the expert)."""
    ids, _ = encode_chat(tokenizer, [(instruction, None)], n_image_tokens)
    return ids + ([tokenizer.special("<|action|>")] if action_token else [])


def vla_batch(items, tokenizer, n_visual_tokens, image_size, state_norm, action_norm=None, action_token=False):
    """Policy inputs from items as EpisodeDataset yields them (at inference: images, state and
    instruction only; images may be a list of (n_frames, H, W, 3) per camera, sizes differing):
        idx (B, T) long: prompts right-padded with <|pad|> to the longest; prefix_mask (B, T) bool
        images (B, n_cam * n_frames, 3, S, S) in [-1, 1] (cameras outer, frames inner, prompt order)
        state (B, n_frames, S) normalized; actions (B, H, A) normalized; action_mask (B, H) bool
    Padding is at the end: a causal VLM never reads it, and the expert masks it out."""
    n_images = sum(len(cam) for cam in items[0]["images"])  # cameras x frames
    prompts = [vla_prompt(tokenizer, it["instruction"], n_images * n_visual_tokens, action_token) for it in items]
    T = max(len(p) for p in prompts)
    pad = tokenizer.special("<|pad|>")
    idx = torch.tensor([p + [pad] * (T - len(p)) for p in prompts], dtype=torch.long)
    prefix_mask = torch.tensor([[True] * len(p) + [False] * (T - len(p)) for p in prompts])
    images = torch.stack([torch.stack([preprocess_image(np.asarray(im), image_size) for cam in it["images"] for im in cam])
                          for it in items])
    state = torch.stack([torch.as_tensor(np.asarray(it["state"], np.float32)) for it in items])
    batch = {"idx": idx, "prefix_mask": prefix_mask, "images": images, "state": state_norm.normalize(state)}
    if action_norm is not None:
        batch["actions"] = action_norm.normalize(torch.stack([it["actions"] for it in items]))
        batch["action_mask"] = torch.stack([it["action_mask"] for it in items])
    return batch


class WindowLoader:
    """Shuffled batches of dataset items, an epoch at a time (a fresh permutation per epoch from
    the seed). All ranks walk one permutation in lockstep and rank r takes the r-th slice of each
    global batch, so ranks never share samples. state_dict() = (epoch, pos): resume is exact."""

    def __init__(self, dataset, batch_size, seed=0, rank=0, world_size=1):
        if len(dataset) < batch_size * world_size:
            raise UserError(f"dataset of {len(dataset)} windows < one global batch of {batch_size * world_size}")
        self.dataset, self.B, self.seed, self.rank, self.world_size = dataset, batch_size, seed, rank, world_size
        self.epoch, self.pos = 0, 0

    def next_batch(self):
        span = self.B * self.world_size
        if self.pos + span > len(self.dataset):  # drop the ragged tail, start a new epoch
            self.epoch, self.pos = self.epoch + 1, 0
        if getattr(self, "_perm_epoch", None) != self.epoch:
            self._perm_epoch, self._perm = self.epoch, np.random.default_rng((self.seed, self.epoch)).permutation(len(self.dataset))
        perm = self._perm
        start = self.pos + self.rank * self.B
        self.pos += span
        return [self.dataset[int(i)] for i in perm[start:start + self.B]]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]
