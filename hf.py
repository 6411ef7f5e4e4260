"""
Pretrained Hugging Face backbones in and out of our own modules (nanoVLM's way): read a local model
directory's config.json, safetensors weights and tokenizer.json, build our config from theirs, and
copy each tensor to the parameter one explicit name table gives. `transformers` is never imported.

    Qwen3ForCausalLM, LlamaForCausalLM           -> model.Transformer
    SiglipVisionModel                            -> model.VisionTower (norm='layer', mlp='gelu_tanh', bias)
    SmolVLMForConditionalGeneration,
    Idefics3ForConditionalGeneration             -> model.VLM (SigLIP tower, pixel shuffle + one linear, Llama)
    Qwen3VLForConditionalGeneration              -> model.VLM (its tower, 2x2 merger, DeepStack, M-RoPE Qwen3)

One global image at the model's resolution, no tiling (the released SmolVLM processor also splits
large images into tiles). Weights are read shard by shard, tensor by tensor, so loading needs about
the model's size in memory. Anything we cannot represent exactly is refused with one line
(data.UserError), never approximated.

    python hf.py export out/llm DIR            our stage-1 checkpoint -> a Qwen3ForCausalLM directory
    python hf.py random-smolvlm DIR [--size=256m|tiny]
                                               a SmolVLM2-shaped directory with random weights (our init)
    python hf.py random-qwen3vl DIR [--size=2b|tiny]
                                               a Qwen3-VL-2B-shaped one (issue 17)
"""
import json
import os
import sys

import torch

import data as D
import model as M

LLM_ARCHS = ("Qwen3ForCausalLM", "LlamaForCausalLM")
VLM_ARCHS = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration", "Qwen3VLForConditionalGeneration")
VISION_ARCHS = ("SiglipVisionModel",)


# -----------------------------------------------------------------------------------------------
# config.json -> our configs

def read_config(hf_dir):
    """config.json as a dict, and its architecture (one we support, else a UserError)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise D.UserError(f"{path} not found: expected a Hugging Face model directory (config.json, model.safetensors)")
    cfg = D.read_json(path, "Hugging Face config")
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in LLM_ARCHS + VLM_ARCHS + VISION_ARCHS:
        raise D.UserError(f"{path}: architecture {arch} is not supported; expected one of "
                          f"{', '.join(LLM_ARCHS + VLM_ARCHS + VISION_ARCHS)}")
    return cfg, arch


def rope_theta(text, where):
    """rope_theta from either config layout (transformers 4: rope_theta + rope_scaling; 5: rope_parameters)."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        raise D.UserError(f"{where}: rope scaling {scaling.get('rope_type', scaling.get('type'))} is not supported "
                          f"(expected plain RoPE: rope_scaling null, rope_type 'default')")
    return float(text.get("rope_theta", params.get("rope_theta", 10000.0)))


def llm_config(text, arch, where, tied, n_layers=0):
    """Our GPTConfig for a Qwen3 or Llama text config; n_layers > 0 keeps only the first n_layers."""
    refuse = {"hidden_act": (text.get("hidden_act", "silu"), "silu"),
              "attention_bias": (text.get("attention_bias", False), False),
              "mlp_bias": (text.get("mlp_bias", False), False),
              "use_sliding_window": (text.get("use_sliding_window", False), False)}
    for key, (got, want) in refuse.items():
        if got != want:
            raise D.UserError(f"{where}: {key} = {got!r} is not supported (expected {want!r})")
    n_layer = text["num_hidden_layers"]
    if n_layers > n_layer:
        raise D.UserError(f"--vlm_layers={n_layers} > the model's {n_layer} layers ({where})")
    n_head = text["num_attention_heads"]
    return M.GPTConfig(
        vocab_size=text["vocab_size"], n_layer=n_layers or n_layer, n_embd=text["hidden_size"], n_head=n_head,
        n_kv_head=text.get("num_key_value_heads") or n_head,
        head_dim=text.get("head_dim") or text["hidden_size"] // n_head, mlp_hidden=text["intermediate_size"],
        max_seq_len=text.get("max_position_embeddings", 2048), rope_theta=rope_theta(text, where),
        qk_norm=arch == "Qwen3ForCausalLM", tie_embeddings=bool(tied), norm_eps=text.get("rms_norm_eps", 1e-6))


def vision_config(vision, where, pixel_shuffle=1, projector="mlp"):
    """Our VisionConfig for a SigLIP (or Idefics3's SigLIP) vision config."""
    if vision.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise D.UserError(f"{where}: vision hidden_act {vision.get('hidden_act')!r} is not supported "
                          f"(expected 'gelu_pytorch_tanh')")
    if vision.get("num_channels", 3) != 3:
        raise D.UserError(f"{where}: num_channels {vision['num_channels']} is not supported (expected 3)")
    n_head = vision["num_attention_heads"]
    return M.VisionConfig(
        image_size=vision["image_size"], patch_size=vision["patch_size"], n_layer=vision["num_hidden_layers"],
        n_embd=vision["hidden_size"], n_head=n_head, head_dim=vision["hidden_size"] // n_head,
        mlp_hidden=vision["intermediate_size"], pixel_shuffle=pixel_shuffle, qk_norm=False,
        norm_eps=vision.get("layer_norm_eps", 1e-6), norm="layer", mlp="gelu_tanh", bias=True, projector=projector,
        pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5))  # SigLIP's processor: (x - 0.5) / 0.5


# -----------------------------------------------------------------------------------------------
# Name tables: Hugging Face tensor name -> our parameter name (one entry per tensor)

def llm_names(hf, ours, config):
    """A Qwen3/Llama decoder. Our parameter names are theirs (model.py chose them so); only the
    prefixes differ: hf = 'model.' (or 'model.text_model.'), ours = '' (or 'llm.')."""
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                 "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    if config.qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    table = {f"{hf}embed_tokens.weight": f"{ours}embed_tokens.weight", f"{hf}norm.weight": f"{ours}norm.weight"}
    for i in range(config.n_layer):
        table.update({f"{hf}layers.{i}.{n}": f"{ours}layers.{i}.{n}" for n in per_layer})
    if not config.tie_embeddings:
        table["lm_head.weight"] = f"{ours}lm_head.weight"
    return table


def vision_names(hf, ours, config):
    """A SigLIP vision tower: embeddings.*, encoder.layers.*, post_layernorm -> VisionTower."""
    table = {f"{hf}embeddings.patch_embedding.weight": f"{ours}patch_embedding.weight",
             f"{hf}embeddings.patch_embedding.bias": f"{ours}patch_embedding.bias",
             f"{hf}embeddings.position_embedding.weight": f"{ours}position_embedding",
             f"{hf}post_layernorm.weight": f"{ours}post_layernorm.weight",
             f"{hf}post_layernorm.bias": f"{ours}post_layernorm.bias"}
    renames = {"layer_norm1": "input_layernorm", "layer_norm2": "post_attention_layernorm",
               "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
               "self_attn.v_proj": "self_attn.v_proj", "self_attn.out_proj": "self_attn.o_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(config.n_layer):
        for theirs, mine in renames.items():
            for kind in ("weight", "bias"):
                table[f"{hf}encoder.layers.{i}.{theirs}.{kind}"] = f"{ours}layers.{i}.{mine}.{kind}"
    return table


def vlm_names(config_llm, config_vision):
    """SmolVLM / Idefics3: model.vision_model.* (SigLIP), model.connector.* (one linear), model.text_model.*."""
    return {**vision_names("model.vision_model.", "vision.", config_vision),
            "model.connector.modality_projection.proj.weight": "projector.linear.weight",
            **llm_names("model.text_model.", "llm.", config_llm)}


# -----------------------------------------------------------------------------------------------
# Weight files

def weight_files(hf_dir):
    """The safetensors files of a directory: model.safetensors, or the shards its index names."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(index):
        weight_map = D.read_json(index, "safetensors index").get("weight_map", {})
        files = sorted(set(weight_map.values()))
        for f in files:
            if not os.path.isfile(os.path.join(hf_dir, f)):
                raise D.UserError(f"{index} names shard {f}, which is missing from {hf_dir}")
        return [os.path.join(hf_dir, f) for f in files]
    if os.path.isfile(single):
        return [single]
    pickles = [f for f in ("pytorch_model.bin", "model.pt", "model.bin") if os.path.isfile(os.path.join(hf_dir, f))]
    if pickles:
        raise D.UserError(f"{os.path.join(hf_dir, pickles[0])} is a pickle; expected model.safetensors (we never "
                          f"unpickle weights: convert it with safetensors first)")
    raise D.UserError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def load_weights(module, table, hf_dir, optional=("head.", "rotary_emb.")):
    """Copy every tensor of the table from the directory's safetensors into module's parameters,
    one shard and one tensor at a time. Shapes must equal ours; every table entry must be found.
    Tensors outside the table are skipped (layers past --vlm_layers, SigLIP's pooling head)."""
    from safetensors import SafetensorError, safe_open
    params = dict(module.named_parameters())
    found = set()
    for path in weight_files(hf_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name not in table:
                        continue
                    # a tuple of our names: a fused tensor (Qwen3-VL's qkv) split along dim 0 into them
                    parts = [params[n] for n in (table[name] if isinstance(table[name], tuple) else (table[name],))]
                    want = (sum(p.size(0) for p in parts), *parts[0].shape[1:])
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != want:
                        raise D.UserError(f"{path}: {name} has shape {shape}, config.json implies {want}")
                    with torch.no_grad():
                        for ours, part in zip(parts, f.get_tensor(name).split([p.size(0) for p in parts])):
                            ours.copy_(part)
                    found.add(name)
        except (SafetensorError, OSError) as e:
            raise D.UserError(f"{path} is not a safetensors file ({str(e).splitlines()[0][:120]})") from None
    missing = [n for n in table if n not in found]
    if missing:
        raise D.UserError(f"{hf_dir}: weights lack {missing[0]} (and {len(missing) - 1} more) that config.json implies")


# -----------------------------------------------------------------------------------------------
# Loaders

def load_llm(hf_dir, weights=True):
    """A Qwen3/Llama directory -> (Transformer, Tokenizer). weights=False: the shape only (resume)."""
    cfg, arch = read_config(hf_dir)
    if arch not in LLM_ARCHS:
        raise D.UserError(f"{hf_dir}/config.json: {arch} is not a language model; expected {' or '.join(LLM_ARCHS)}")
    where = os.path.join(hf_dir, "config.json")
    config = llm_config(cfg, arch, where, cfg.get("tie_word_embeddings", False))
    llm = M.Transformer(config)
    if weights:
        load_weights(llm, llm_names("model.", "", config), hf_dir)
    return llm, load_tokenizer(hf_dir)


def load_vision(hf_dir):
    """A SiglipVisionModel directory -> VisionTower (patch features after post_layernorm)."""
    cfg, arch = read_config(hf_dir)
    if arch not in VISION_ARCHS:
        raise D.UserError(f"{hf_dir}/config.json: {arch} is not a vision tower; expected SiglipVisionModel")
    vision = cfg.get("vision_config", cfg)
    config = vision_config(vision, os.path.join(hf_dir, "config.json"))
    tower = M.VisionTower(config)
    # transformers 5 saves SiglipVisionModel without the 'vision_model.' prefix, 4.x (and SiglipModel) with it
    with_prefix = any(k.startswith("vision_model.") for k in tensor_names(hf_dir))
    load_weights(tower, vision_names("vision_model." if with_prefix else "", "", config), hf_dir)
    return tower


def tensor_names(hf_dir):
    from safetensors import SafetensorError, safe_open
    names = []
    for path in weight_files(hf_dir):
        try:
            with safe_open(path, framework="pt") as f:
                names += list(f.keys())
        except (SafetensorError, OSError) as e:
            raise D.UserError(f"{path} is not a safetensors file ({str(e).splitlines()[0][:120]})") from None
    return names


def load_vlm(hf_dir, n_layers=0, weights=True):
    """A SmolVLM/Idefics3 directory -> (VLM, Tokenizer). n_layers > 0: only the LLM's first n_layers
    (SmolVLA keeps 16 of 32). The tokenizer's '<|image|>' role is the model's image token."""
    cfg, arch = read_config(hf_dir)
    if arch not in VLM_ARCHS:
        raise D.UserError(f"{hf_dir}/config.json: {arch} is not a vision-language model; expected "
                          f"{' or '.join(VLM_ARCHS)}")
    if arch == "Qwen3VLForConditionalGeneration":
        return load_qwen3vl(hf_dir, n_layers, weights)
    where = os.path.join(hf_dir, "config.json")
    text, vision = cfg["text_config"], cfg["vision_config"]
    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    if text.get("model_type", "llama") != "llama":
        raise D.UserError(f"{where}: text model {text.get('model_type')} is not supported (expected llama)")
    llm_cfg = llm_config(text, "LlamaForCausalLM", where, tied, n_layers)
    vision_cfg = vision_config(vision, where, cfg.get("scale_factor", 2), projector="linear")
    if "image_token_id" not in cfg:
        raise D.UserError(f"{where}: no image_token_id")
    vlm = M.VLM(llm_cfg, vision_cfg, cfg["image_token_id"])
    if weights:
        load_weights(vlm, vlm_names(llm_cfg, vision_cfg), hf_dir)
    return vlm, load_tokenizer(hf_dir)


def add_chat_tokens(llm, tokenizer, action=False):
    """Our prompt roles the model's tokenizer lacks (<|user|>, <|assistant|>, <|pad|>, and <|action|>
    for action_token conditioning) as new tokens, their embedding rows at the mean of the others
    (model.grow_embeddings); the model's own image and end-of-text tokens are kept. Returns the tokenizer."""
    tokenizer = D.add_special_tokens(tokenizer, list(D.CHAT_TOKENS) + (["<|action|>"] if action else []))
    M.grow_embeddings(llm, -(-tokenizer.n_vocab // 64) * 64)
    return tokenizer


def image_size(hf_dir):
    """The vision tower's input resolution of a VLM directory (stage 2 renders its data at it)."""
    cfg, arch = read_config(hf_dir)
    if arch == "Qwen3VLForConditionalGeneration":
        return qwen3vl_image_size(cfg.get("vision_config", {}))
    return cfg.get("vision_config", {}).get("image_size", 0)


def architecture(hf_dir):
    """'llm', 'vlm' or 'vision' for a supported directory."""
    _, arch = read_config(hf_dir)
    return "llm" if arch in LLM_ARCHS else "vlm" if arch in VLM_ARCHS else "vision"


def init_dir(init):
    """The directory of an --init=hf:DIR setting, or None for any other --init."""
    if not init.startswith("hf:"):
        return None
    path = init[3:]
    if not os.path.isdir(path):
        raise D.UserError(f"--init={init}: {path} is not a directory (expected a Hugging Face model directory)")
    read_config(path)  # a supported architecture, or one line saying what is not
    return path


# -----------------------------------------------------------------------------------------------
# tokenizer.json (byte-level BPE) <-> data.Tokenizer (tiktoken)

def bytes_to_unicode():
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in:
    printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100 onwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


# The regexes of tokenizers' pre-tokenizers as one tiktoken pattern. ByteLevel(use_regex=True) is GPT-2's.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits) then GPT-2's (SmolLM2, SmolVLM): every digit alone, and whitespace before a
# digit ends a run as the end of a split would (hence the lookahead lets a digit follow).
GPT2_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def pre_tokenizer_pattern(pre, where):
    """One regex equal to a supported pre-tokenizer, else a UserError naming it."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and byte_level.get("add_prefix_space", False):
        raise D.UserError(f"{where}: ByteLevel add_prefix_space=true is not supported")
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True) \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and "Regex" in steps[0]["pattern"]:
        return steps[0]["pattern"]["Regex"]
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return GPT2_DIGITS_PATTERN
    raise D.UserError(f"{where}: pre-tokenizer {kinds} is not supported (expected byte-level BPE: ByteLevel, "
                      f"Split+ByteLevel or Digits+ByteLevel)")


def load_tokenizer(hf_dir):
    """tokenizer.json -> data.Tokenizer with the same ids: ranks = vocabulary ids (tiktoken merges
    the adjacent pair whose concatenation has the lowest rank; equal to BPE's merge order when the
    ids grow with the merges, which is checked), every added token a tiktoken special token, and
    roles naming the model's end-of-text, pad and image tokens for our prompt builders."""
    model_cfg, arch = read_config(hf_dir)
    eos_id = model_cfg.get("eos_token_id", model_cfg.get("text_config", {}).get("eos_token_id"))
    image_id = model_cfg.get("image_token_id") if arch in VLM_ARCHS else None
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise D.UserError(f"{path} not found: the model directory needs its tokenizer")
    obj = D.read_json(path, "tokenizer")
    bpe = obj.get("model") or {}
    if bpe.get("type") != "BPE":
        raise D.UserError(f"{path}: model type {bpe.get('type')} is not supported (expected byte-level BPE)")
    normalizer = (obj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise D.UserError(f"{path}: normalizer {normalizer} is not supported (expected none or NFC)")
    pattern = pre_tokenizer_pattern(obj.get("pre_tokenizer"), path)
    added = {t["content"]: t["id"] for t in obj.get("added_tokens", [])}
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(byte_of[ch] for ch in tok): i for tok, i in bpe["vocab"].items() if tok not in added}
    except KeyError as e:
        raise D.UserError(f"{path}: vocabulary entry with character {e} is not byte-level BPE") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise D.UserError(f"{path}: the vocabulary lacks {len(missing)} of the 256 single bytes (e.g. {missing[0]})")
    last = -1
    for merge in bpe.get("merges", []):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        rank = ranks.get(bytes(byte_of[ch] for ch in a + b))
        if rank is None or rank < last:  # equal: another split of the same token
            raise D.UserError(f"{path}: merge {a!r} + {b!r} is out of vocabulary-id order; tiktoken cannot "
                              f"reproduce this BPE exactly")
        last = rank
    roles = {}
    config = D.read_json(os.path.join(hf_dir, "tokenizer_config.json"), "tokenizer config") \
        if os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")) else {}
    token_name = lambda v: v.get("content") if isinstance(v, dict) else v
    eos = token_name(config.get("eos_token"))
    if "<|endoftext|>" not in added:
        eos_ids = eos_id if isinstance(eos_id, list) else [eos_id]
        if eos in added:
            roles["<|endoftext|>"] = added[eos]
        elif eos_ids[0] is not None:
            roles["<|endoftext|>"] = eos_ids[0]
    pad = token_name(config.get("pad_token"))
    if "<|pad|>" not in added and pad in added:
        roles["<|pad|>"] = added[pad]
    if image_id is not None:  # and the markers around a global image (SmolVLM's processor, without tiling)
        roles["<|image|>"] = image_id
        for role, token in [("<|image_start|>", "<fake_token_around_image>"), ("<|image_global|>", "<global-img>"),
                            ("<|image_end|>", "<fake_token_around_image>")]:
            if token in added:
                roles[role] = added[token]
    tokenizer = D.Tokenizer(ranks, pattern, added, roles, nfc=normalizer == "NFC")
    return D.add_special_tokens(tokenizer, ["<|endoftext|>"])  # stage 1 needs it; the others come with stage 2


def write_tokenizer(tokenizer, path):
    """data.Tokenizer -> a tokenizer.json of the `tokenizers` library: byte-level BPE, our
    pre-tokenizer regex, every rank a vocabulary entry, merges derived from the ranks (each token of
    two or more bytes as every split into two lower-ranked tokens, in rank order), specials added."""
    char = bytes_to_unicode()
    text = lambda b: "".join(char[x] for x in b)
    vocab = {**{text(b): r for b, r in tokenizer.ranks.items()}, **tokenizer.special_tokens}  # tokenizers wants both
    merges = []
    for token, rank in sorted(tokenizer.ranks.items(), key=lambda kv: kv[1]):
        for cut in range(1, len(token)):
            left, right = tokenizer.ranks.get(token[:cut]), tokenizer.ranks.get(token[cut:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, right, [text(token[:cut]), text(token[cut:])]))
    merges.sort(key=lambda m: m[:3])
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])]
    obj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
           "normalizer": {"type": "NFC"} if tokenizer.nfc else None,
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                     "vocab": vocab, "merges": [m[3] for m in merges]}}
    with open(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False)


# -----------------------------------------------------------------------------------------------
# Export: our stage-1 checkpoint -> a Qwen3ForCausalLM directory

def write_safetensors(module, table, path):
    """module's tensors under their Hugging Face names (the inverse of a name table)."""
    from safetensors.torch import save_file
    params = dict(module.named_parameters())
    tensor = lambda ours: torch.cat([params[n] for n in ours]) if isinstance(ours, tuple) else params[ours]
    save_file({hf: tensor(ours).detach().cpu().contiguous() for hf, ours in table.items()}, path,
              metadata={"format": "pt"})


def qwen3_config(c, eos_id):
    """Our GPTConfig as a Qwen3 config.json (Qwen3 has QK-norm; without it the block is Llama's)."""
    arch, model_type = ("Qwen3ForCausalLM", "qwen3") if c.qk_norm else ("LlamaForCausalLM", "llama")
    return {"architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size,
            "hidden_size": c.n_embd, "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
            "hidden_act": "silu", "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "use_sliding_window": False,
            "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32"}


def export_llm(ckpt_dir, out_dir):
    """Our stage-1 checkpoint (a run directory or a step_* one) -> out_dir: config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json. Returns out_dir."""
    from train_llm import find_checkpoint
    path = find_checkpoint(ckpt_dir)
    llm, cfg = M.load_llm(path)
    if cfg.get("stage", "llm") != "llm":
        raise D.UserError(f"{path} is a stage-{cfg.get('stage')} checkpoint; export takes a stage-1 (llm) one")
    tokenizer = D.Tokenizer.load(os.path.join(path, "tokenizer.json"))
    os.makedirs(out_dir, exist_ok=True)
    eos = tokenizer.eot_id
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(qwen3_config(llm.config, eos), f, indent=2)
    write_safetensors(llm, llm_names("model.", "", llm.config), os.path.join(out_dir, "model.safetensors"))
    write_tokenizer(tokenizer, os.path.join(out_dir, "tokenizer.json"))
    eos_text = next(s for s, i in tokenizer.special_ids.items() if i == eos)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_text,
                   "pad_token": "<|pad|>" if "<|pad|>" in tokenizer.special_tokens else eos_text,
                   "model_max_length": llm.config.max_seq_len}, f, indent=2)
    return out_dir


# -----------------------------------------------------------------------------------------------
# A SmolVLM2-shaped directory with random weights (no download needed: measurements, smoke runs)

SMOLVLM_SHAPES = {  # SmolVLM2-256M-Video-Instruct's config.json sizes; 'tiny' for tests and smoke runs
    "256m": dict(text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0),
                 vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             image_size=512, patch_size=16), scale_factor=4),
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, rope_theta=100000.0),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8), scale_factor=2),
}


def write_random_smolvlm(out_dir, size="256m", vocab_text=None):
    """out_dir = config.json (SmolVLMForConditionalGeneration), model.safetensors (our init, under
    SmolVLM's names) and a tokenizer.json (a small BPE trained on the built-in world's language:
    a real 49k vocabulary cannot be downloaded here; the embedding has SmolVLM's 49,280 rows)."""
    if size not in SMOLVLM_SHAPES:
        raise D.UserError(f"--size={size}: expected one of {', '.join(SMOLVLM_SHAPES)}")
    shape = SMOLVLM_SHAPES[size]
    os.makedirs(out_dir, exist_ok=True)
    if vocab_text is None:
        from eval_sim import language_corpus
        vocab_text = language_corpus(300, seed=0, split="train")
    base = D.Tokenizer.train(vocab_text, 512)
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                "<image>", "<global-img>"]
    tokenizer = D.Tokenizer(base.ranks, base.pattern, {s: len(base.ranks) + i for i, s in enumerate(specials)})
    vocab = 49280 if size == "256m" else 640
    text = {**shape["text"], "vocab_size": vocab, "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "eos_token_id": tokenizer.special_tokens["<end_of_utterance>"], "tie_word_embeddings": False}
    vision = {**shape["vision"], "model_type": "smolvlm_vision", "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
    config = {"architectures": ["SmolVLMForConditionalGeneration"], "model_type": "smolvlm",
              "image_token_id": tokenizer.special_tokens["<image>"], "scale_factor": shape["scale_factor"],
              "tie_word_embeddings": False, "text_config": text, "vision_config": vision}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    where = os.path.join(out_dir, "config.json")
    llm_cfg = llm_config(text, "LlamaForCausalLM", where, False)
    vision_cfg = vision_config(vision, where, shape["scale_factor"], "linear")
    vlm = M.VLM(llm_cfg, vision_cfg, config["image_token_id"])
    write_safetensors(vlm, vlm_names(llm_cfg, vision_cfg), os.path.join(out_dir, "model.safetensors"))
    write_tokenizer(tokenizer, os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<end_of_utterance>", "pad_token": "<|pad|>"}, f)
    return out_dir


# -----------------------------------------------------------------------------------------------
# --- Qwen3-VL (issue 17): Qwen3VLForConditionalGeneration -> model.VLM
#
#   vision tower  VisionTower(temporal_patch_size=2, position_grid, rope_theta, deepstack_layers) with
#                 SigLIP-like blocks (LayerNorm, GELU(tanh) MLP, biases; qkv stored fused, split here)
#   merger        merger.norm = the tower's post_layernorm; 2x2 pixel shuffle + MLP = Projector('mlp')
#   DeepStack     deepstack_merger_list.k = VLM.projector.deepstack[k] (LayerNorm after the shuffle)
#   text model    Qwen3 blocks, interleaved multimodal RoPE (GPTConfig.mrope_section)
#
# Limits: one still image per placeholder run at a fixed square resolution (QWEN3VL_MERGED_SIDE visual
# tokens a side: 256 px for the released 16-px patches), no video, no dynamic resolution.

QWEN3VL_MERGED_SIDE = 8  # visual tokens per image side: image_size = 8 * patch_size * spatial_merge_size


def qwen3vl_image_size(vision):
    return QWEN3VL_MERGED_SIDE * vision.get("patch_size", 16) * vision.get("spatial_merge_size", 2)


def qwen3vl_configs(cfg, where, n_layers=0, image_size=0, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5)):
    """Our (GPTConfig, VisionConfig) for a Qwen3-VL config.json; what we cannot represent is a UserError."""
    text, vision = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    if "image_token_id" not in cfg:
        raise D.UserError(f"{where}: no image_token_id (a video-only model?); we take still images")
    if text.get("model_type", "qwen3_vl_text") != "qwen3_vl_text":
        raise D.UserError(f"{where}: text model {text.get('model_type')} is not supported (expected qwen3_vl_text)")
    # transformers 5 writes mrope_section into rope_parameters, 4.x into rope_scaling (type 'default')
    params, scaling = text.get("rope_parameters") or {}, text.get("rope_scaling") or {}
    section = params.get("mrope_section") or scaling.get("mrope_section")
    mrope = lambda d: {k: v for k, v in d.items() if k not in ("mrope_section", "mrope_interleaved")}
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = {}
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if not section or len(section) != 3 or sum(section) != head_dim // 2:
        raise D.UserError(f"{where}: mrope_section {section} must be three counts summing to head_dim / 2 = {head_dim // 2}")
    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    llm_cfg = llm_config({**text, "rope_parameters": mrope(params), "rope_scaling": mrope(scaling) or None},
                         "Qwen3ForCausalLM", where, tied, n_layers)
    llm_cfg.max_seq_len = min(llm_cfg.max_seq_len, 32768)  # the 1-D RoPE table (262,144 positions would be 268 MB)
    llm_cfg.mrope_section = tuple(section)
    checks = {"hidden_act": (vision.get("hidden_act", "gelu_pytorch_tanh"), "gelu_pytorch_tanh"),
              "in_channels": (vision.get("in_channels", 3), 3),
              "rope_type": ((vision.get("rope_parameters") or {}).get("rope_type", "axial"), "axial"),
              "out_hidden_size": (vision.get("out_hidden_size"), text["hidden_size"])}
    for key, (got, want) in checks.items():
        if got != want:
            raise D.UserError(f"{where}: vision_config {key} = {got!r} is not supported (expected {want!r})")
    for key in ("patch_size", "temporal_patch_size", "spatial_merge_size"):
        if not isinstance(vision.get(key, 2), int):
            raise D.UserError(f"{where}: vision_config {key} = {vision[key]!r}: expected one integer")
    patch, merge, depth = vision.get("patch_size", 16), vision.get("spatial_merge_size", 2), vision["depth"]
    image_size = image_size or qwen3vl_image_size(vision)
    if image_size % (patch * merge):
        raise D.UserError(f"image size {image_size} is not a multiple of patch_size x spatial_merge_size = {patch * merge} ({where})")
    side = round(vision.get("num_position_embeddings", 2304) ** 0.5)
    if side * side != vision.get("num_position_embeddings", 2304):
        raise D.UserError(f"{where}: num_position_embeddings {vision['num_position_embeddings']} is not a square grid")
    deepstack = tuple(vision.get("deepstack_visual_indexes", ()))
    if any(not 0 <= i < depth for i in deepstack) or len(deepstack) > llm_cfg.n_layer:
        raise D.UserError(f"{where}: deepstack_visual_indexes {list(deepstack)} need tower layers < depth {depth} and "
                          f"at most {llm_cfg.n_layer} LLM layers to add to")
    hidden, n_head = vision["hidden_size"], vision["num_heads"]
    vision_cfg = M.VisionConfig(
        image_size=image_size, patch_size=patch, n_layer=depth, n_embd=hidden, n_head=n_head,
        head_dim=hidden // n_head, mlp_hidden=vision["intermediate_size"], pixel_shuffle=merge,
        projector_hidden=hidden * merge * merge, qk_norm=False, norm_eps=1e-6, norm="layer", mlp="gelu_tanh", bias=True,
        projector="mlp", pixel_mean=tuple(pixel_mean), pixel_std=tuple(pixel_std),
        temporal_patch_size=vision.get("temporal_patch_size", 2), position_grid=side,
        rope_theta=float((vision.get("rope_parameters") or {}).get("rope_theta", 10000.0)), deepstack_layers=deepstack)
    return llm_cfg, vision_cfg


def qwen3vl_names(llm_cfg, vision_cfg):
    """model.visual.* -> vision.*, projector.* (DeepStack's: projector.deepstack.*); model.language_model.* -> llm.*"""
    v = "model.visual."
    table = {f"{v}pos_embed.weight": "vision.position_embedding"}
    merger = {"norm": None, "linear_fc1": "linear_1", "linear_fc2": "linear_2"}
    for kind in ("weight", "bias"):
        table[f"{v}patch_embed.proj.{kind}"] = f"vision.patch_embedding.{kind}"
        table[f"{v}merger.norm.{kind}"] = f"vision.post_layernorm.{kind}"
        for theirs in ("linear_fc1", "linear_fc2"):
            table[f"{v}merger.{theirs}.{kind}"] = f"projector.{merger[theirs]}.{kind}"
        for k in range(len(vision_cfg.deepstack_layers)):
            for theirs, mine in merger.items():
                table[f"{v}deepstack_merger_list.{k}.{theirs}.{kind}"] = f"projector.deepstack.{k}.{mine or 'norm'}.{kind}"
        for i in range(vision_cfg.n_layer):
            ours = f"vision.layers.{i}."
            table.update({f"{v}blocks.{i}.norm1.{kind}": f"{ours}input_layernorm.{kind}",
                          f"{v}blocks.{i}.norm2.{kind}": f"{ours}post_attention_layernorm.{kind}",
                          f"{v}blocks.{i}.attn.qkv.{kind}": tuple(f"{ours}self_attn.{p}_proj.{kind}" for p in "qkv"),
                          f"{v}blocks.{i}.attn.proj.{kind}": f"{ours}self_attn.o_proj.{kind}",
                          f"{v}blocks.{i}.mlp.linear_fc1.{kind}": f"{ours}mlp.fc1.{kind}",
                          f"{v}blocks.{i}.mlp.linear_fc2.{kind}": f"{ours}mlp.fc2.{kind}"})
    return {**table, **llm_names("model.language_model.", "llm.", llm_cfg)}


def load_qwen3vl(hf_dir, n_layers=0, weights=True, image_size=0):
    """A Qwen3VLForConditionalGeneration directory -> (VLM, Tokenizer). image_size 0: the fixed default
    (qwen3vl_image_size); pixel statistics from preprocessor_config.json when present (else 0.5, 0.5)."""
    cfg, _ = read_config(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    pre = os.path.join(hf_dir, "preprocessor_config.json")
    pre = D.read_json(pre, "preprocessor config") if os.path.isfile(pre) else {}
    llm_cfg, vision_cfg = qwen3vl_configs(cfg, where, n_layers, image_size, pre.get("image_mean", (0.5,) * 3),
                                          pre.get("image_std", (0.5,) * 3))
    vlm = M.VLM(llm_cfg, vision_cfg, cfg["image_token_id"])
    if weights:
        load_weights(vlm, qwen3vl_names(llm_cfg, vision_cfg), hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    for role, token in [("<|image_start|>", "<|vision_start|>"), ("<|image_end|>", "<|vision_end|>")]:
        if token in tokenizer.special_tokens:  # Qwen's template: <|vision_start|> <|image_pad|> x n <|vision_end|>
            tokenizer.roles[role] = tokenizer.special_tokens[token]
    return vlm, tokenizer


QWEN3VL_SHAPES = {  # Qwen3-VL-2B-Instruct's config.json sizes (as released); 'tiny' for tests and smoke runs
    "2b": dict(text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20],
                                              mrope_interleaved=True)),
               vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                           num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
               vocab=151936, tied=True),
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[2, 3, 3],
                                                mrope_interleaved=True)),
                 vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                             num_position_embeddings=16, deepstack_visual_indexes=[0]),
                 vocab=640, tied=True),
}


def world_tokenizer(vocab_text, specials):
    """A 512-rank BPE trained on the built-in world's language (or vocab_text), then the given specials."""
    if vocab_text is None:
        from eval_sim import language_corpus
        vocab_text = language_corpus(300, seed=0, split="train")
    base = D.Tokenizer.train(vocab_text, 512)
    return D.Tokenizer(base.ranks, base.pattern, {s: len(base.ranks) + i for i, s in enumerate(specials)})


def write_random_qwen3vl(out_dir, size="2b", vocab_text=None, shard_bytes=2 ** 30):
    """out_dir = a Qwen3VLForConditionalGeneration directory with our init's random weights: config.json,
    bf16 safetensors shards (as released) + index, and a tokenizer.json (a small BPE trained on the
    built-in world's language; the embedding keeps the real vocabulary's rows). Written one shard at a time."""
    if size not in QWEN3VL_SHAPES:
        raise D.UserError(f"--size={size}: expected one of {', '.join(QWEN3VL_SHAPES)}")
    from safetensors.torch import save_file
    shape = QWEN3VL_SHAPES[size]
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = world_tokenizer(vocab_text, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                             "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    ids = tokenizer.special_tokens
    text = {**shape["text"], "vocab_size": shape["vocab"], "model_type": "qwen3_vl_text", "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "attention_bias": False, "eos_token_id": ids["<|im_end|>"]}
    vision = {**shape["vision"], "model_type": "qwen3_vl_vision", "hidden_act": "gelu_pytorch_tanh", "in_channels": 3,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": text["hidden_size"],
              "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}
    config = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
              "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
              "tie_word_embeddings": shape["tied"], "text_config": text, "vision_config": vision}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    llm_cfg, vision_cfg = qwen3vl_configs(config, os.path.join(out_dir, "config.json"))
    vlm = M.VLM(llm_cfg, vision_cfg, config["image_token_id"])
    params = dict(vlm.named_parameters())
    tensor = lambda ours: torch.cat([params[n] for n in ours]) if isinstance(ours, tuple) else params[ours]
    shards, size_now = [[]], 0  # names per shard, then each shard converted and written alone
    for hf_name, ours in qwen3vl_names(llm_cfg, vision_cfg).items():
        if size_now >= shard_bytes:
            shards.append([])
            size_now = 0
        shards[-1].append((hf_name, ours))
        size_now += sum(params[n].numel() for n in (ours if isinstance(ours, tuple) else (ours,))) * 2
    weight_map = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensor(ours).detach().to(torch.bfloat16).contiguous() for n, ours in names},
                  os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({n: file for n, _ in names})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    write_tokenizer(tokenizer, os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)
    return out_dir


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    options = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    words = [a for a in args if not a.startswith("--")]
    if words[:1] == ["export"] and len(words) == 3:
        out = export_llm(words[1], words[2])
        print(f"exported {words[1]} -> {out} (config.json, model.safetensors, tokenizer.json)")
    elif words[:1] == ["random-qwen3vl"] and len(words) == 2:
        out = write_random_qwen3vl(words[1], options.get("size", "2b"))
        print(f"wrote a random Qwen3-VL-{options.get('size', '2b')}-shaped model -> {out}")
    elif words[:1] == ["random-smolvlm"] and len(words) == 2:
        out = write_random_smolvlm(words[1], options.get("size", "256m"))
        print(f"wrote a random SmolVLM2-{options.get('size', '256m')}-shaped model -> {out}")
    else:
        raise D.UserError("usage: python hf.py export CHECKPOINT OUT_DIR | python hf.py random-smolvlm OUT_DIR "
                          "[--size=256m|tiny] | python hf.py random-qwen3vl OUT_DIR [--size=2b|tiny]")


if __name__ == "__main__":
    from train_llm import run
    run(main)
