"""
Data for every stage: the tokenizer, token shards for stage 1, image-text data for stage 2 and
robot episodes for stage 3. Stores, tokenizes and batches; the language and scenes of the built-in
world are made in eval_sim.py. Imports nothing of ours.

    documents (.txt / .jsonl / generated) --Tokenizer--> token shards (.bin) --TokenLoader--> (x, y)

Token shard = a 256 x int32 header (magic, version, bytes per token, token count), then the tokens
as uint16 (vocab <= 65536) or uint32, as in llm.c. Read by memory-mapping.
"""
import base64
import glob
import heapq
import json
import os
import unicodedata
from collections import Counter, defaultdict

import numpy as np
import torch


class UserError(Exception):
    """Bad input from a person: the CLIs print it as one line and exit with code 2."""


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
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)

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
        except (json.JSONDecodeError, KeyError, TypeError) as e:
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
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype).tobytes())
    os.replace(tmp, path)


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
    h, w = image.shape[:2]
    if (h, w) != (size, size):
        from PIL import Image
        scale = size / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
    x = torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1).float() / 255  # (3, h, w)
    if rng is not None:
        brightness, contrast = rng.uniform(0.9, 1.1, size=2)
        x = ((x - x.mean()) * contrast + x.mean() * brightness).clamp(0, 1)
    out = torch.full((3, size, size), 0.5)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top:top + h, left:left + w] = x
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
    """Batches (idx (B, T), targets (B, T), images (B, n_images, 3, S, S)) of chat sequences.

    examples: a list, or a function index -> example with num_examples (the built-in world renders
    scenes on demand). Each epoch visits the examples in a fresh order seeded by (seed, epoch); all
    ranks step through that one order in lockstep, rank r taking the r-th slice of every
    world_size * B examples, so ranks never share data and one process with grad_accum = n sees the
    data of n processes. targets are the next tokens where loss_mask says so, else -1. Rows are
    padded with <|pad|> to the longest, rounded up to a multiple of 32 (few shapes to compile).
    An unreadable image is a UserError naming it; with skip_bad the next example takes its place
    and it is counted in `skipped`. The position is the resumable state (state_dict)."""

    def __init__(self, examples, tokenizer, batch_size, seq_len, image_size, n_visual_tokens, rank=0,
                 world_size=1, num_examples=None, shuffle=True, seed=0, augment=False, skip_bad=False):
        self.examples, self.tokenizer = examples, tokenizer
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
        """Example i -> (ids, loss_mask, images (n_images, 3, S, S)); with skip_bad, the first readable
        example from i on."""
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
            return ids, mask, images
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
        """[(ids, loss_mask, images)] -> padded (idx, targets, images); input = ids[:-1], targets = ids[1:]."""
        if len({r[2].size(0) for r in rows}) > 1:
            raise UserError("examples in one batch have different numbers of images; give every example the same number")
        T = min(-(-max(len(r[0]) - 1 for r in rows) // 32) * 32, self.seq_len)
        idx = torch.full((len(rows), T), self.tokenizer.special("<|pad|>"), dtype=torch.long)
        targets = torch.full((len(rows), T), -1, dtype=torch.long)
        for b, (ids, mask, _) in enumerate(rows):
            ids, mask = torch.tensor(ids), torch.tensor(mask)
            n = len(ids) - 1
            idx[b, :n] = ids[:-1]
            targets[b, :n] = torch.where(mask[1:], ids[1:], -1)
        return idx, targets, torch.stack([r[2] for r in rows])

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
        if state.shape != (T, len(self.meta["state_names"])) or action.shape != (T, len(self.meta["action_names"])):
            raise UserError(f"episode state {state.shape} / action {action.shape} do not match "
                            f"{len(self.meta['state_names'])} state and {len(self.meta['action_names'])} action dims")
        for cam in self.cameras:
            if images[cam].shape != (T, H, W, 3) or images[cam].dtype != np.uint8:
                raise UserError(f"camera {cam}: expected ({T}, {H}, {W}, 3) uint8, got "
                                f"{images[cam].shape} {images[cam].dtype}")
        name = f"episodes/episode_{len(self.lines):06d}.npz"
        np.savez_compressed(os.path.join(self.root, name), state=state, action=action,
                            **{f"images_{cam}": images[cam] for cam in self.cameras})
        self.lines.append({"file": name, "length": T, "task": task, "instruction": instruction,
                           "success": bool(success), **extra})
        self.states.append(state)
        self.actions.append(action)

    def close(self):
        with open(os.path.join(self.root, "episodes.jsonl"), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in self.lines)
        self.meta.update(num_episodes=len(self.lines), num_frames=sum(len(a) for a in self.actions))
        with open(os.path.join(self.root, "meta.json"), "w") as f:
            json.dump(self.meta, f, indent=1)
        stats = {"state": episode_stats(np.concatenate(self.states)),
                 "action": episode_stats(np.concatenate(self.actions))}
        with open(os.path.join(self.root, "stats.json"), "w") as f:
            json.dump(stats, f, indent=1)


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found: is this an episode dataset (see eval_sim.py collect)?")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a valid {what}: {e}")


class EpisodeDataset:
    """Samples (past frames, future action chunk) windows from every step of every episode.

    item = {"images": (n_cam, n_frames, H, W, 3) uint8, "state": (n_frames, S) float32,
            "actions": (chunk_size, A) float32, "action_mask": (chunk_size,) bool,
            "instruction": str, "task": str}
    Past frames before the episode start repeat the first frame; actions after the episode end
    repeat the last action with action_mask False. Episodes are small: all are held in memory."""

    def __init__(self, root, n_frames=1, chunk_size=8, cameras=("scene", "wrist"), episode_ids=None, frame_stride=1):
        self.meta = _read_json(os.path.join(root, "meta.json"), "dataset metadata file")
        self.stats = _read_json(os.path.join(root, "stats.json"), "statistics file")
        missing = [c for c in cameras if c not in self.meta.get("cameras", [])]
        if missing:
            raise UserError(f"{root} has cameras {self.meta.get('cameras')}, not {missing}")
        try:
            with open(os.path.join(root, "episodes.jsonl")) as f:
                lines = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {root}/episodes.jsonl: {e}")
        ids = range(len(lines)) if episode_ids is None else episode_ids
        self.n_frames, self.chunk_size, self.cameras = n_frames, chunk_size, tuple(cameras)
        self.frame_stride = frame_stride  # steps between past frames (a policy re-planning every k steps sees every k-th)
        self.episodes, self.index = [], []
        for e in ids:
            line = lines[e]
            try:
                with np.load(os.path.join(root, line["file"])) as z:
                    ep = {"images": np.stack([z[f"images_{c}"] for c in cameras]),  # (n_cam, T, H, W, 3)
                          "state": z["state"], "action": z["action"]}
            except (OSError, KeyError, ValueError) as err:
                raise UserError(f"episode {line.get('file')} in {root} is unreadable: {err}")
            ep.update(instruction=line["instruction"], task=line["task"], length=len(ep["action"]))
            self.index += [(len(self.episodes), t) for t in range(ep["length"])]
            self.episodes.append(ep)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        e, t = self.index[i]
        ep = self.episodes[e]
        past = np.clip(np.arange(t - (self.n_frames - 1) * self.frame_stride, t + 1, self.frame_stride), 0, None)
        future = np.arange(t, t + self.chunk_size)
        return {"images": torch.from_numpy(ep["images"][:, past]),
                "state": torch.from_numpy(ep["state"][past]),
                "actions": torch.from_numpy(ep["action"][np.minimum(future, ep["length"] - 1)]),
                "action_mask": torch.from_numpy(future < ep["length"]),
                "instruction": ep["instruction"], "task": ep["task"]}


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
    instruction only):
        idx (B, T) long: prompts right-padded with <|pad|> to the longest; prefix_mask (B, T) bool
        images (B, n_cam * n_frames, 3, S, S) in [-1, 1] (cameras outer, frames inner, prompt order)
        state (B, n_frames, S) normalized; actions (B, H, A) normalized; action_mask (B, H) bool
    Padding is at the end: a causal VLM never reads it, and the expert masks it out."""
    n_images = items[0]["images"].shape[0] * items[0]["images"].shape[1]
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
