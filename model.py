"""
The nanofoundry model: one plain-PyTorch transformer that grows, stage by stage.

    stage 1  Transformer        Llama/Qwen3-style decoder: a language model
    stage 2  + vision tower     ViT + pixel-shuffle projector: a vision-language model
    stage 3  + action expert    flow matching over action chunks: a robot policy

The decoder block (used unchanged by every tower):

    x ─┬─ RMSNorm ─ Attention(RoPE, GQA, QK-norm, SDPA) ─(+)─┬─ RMSNorm ─ SwiGLU MLP ─(+)─> x
       └──────────────────────────────────────────────────┘  └────────────────────────┘

Module and parameter names follow Hugging Face Qwen3/Llama (q_proj, k_proj, v_proj, o_proj,
q_norm, k_norm, gate_proj, up_proj, down_proj, input_layernorm, post_attention_layernorm,
embed_tokens, norm, lm_head) so pretrained weights map onto these modules one to one (hf.py holds
the name tables). A pretrained SigLIP tower's differences (LayerNorm, GELU-tanh MLP, biases) are
settings of the same Block, and SmolVLM's connector is Projector(projector='linear').

Imports torch (and safetensors for the weight files) only.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 2048        # embedding rows (>= tokenizer size; padded to a multiple of 64)
    n_layer: int = 4
    n_embd: int = 256             # residual stream width
    n_head: int = 4               # query heads
    n_kv_head: int = 2            # key/value heads (GQA: n_head must be a multiple)
    head_dim: int = 64            # independent of n_embd, as in Qwen3
    mlp_hidden: int = 768         # SwiGLU inner width
    max_seq_len: int = 256        # RoPE table length (and KV-cache default)
    rope_theta: float = 10000.0
    qk_norm: bool = True          # RMSNorm on q and k per head (Qwen3): steadier at high LR
    tie_embeddings: bool = True   # lm_head shares embed_tokens.weight
    norm_eps: float = 1e-6
    mrope_section: tuple = ()     # Qwen3-VL: (t, h, w) frequency counts of interleaved multimodal RoPE
                                  # (sum = head_dim / 2); () = plain RoPE. See mrope_table


def config_from_dict(cls, d):
    """Build a config dataclass from a dict, ignoring keys the class does not have."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# -----------------------------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # weight cast to the activations' dtype so bf16 autocast hits the fused kernel
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


def rope_table(seq_len, head_dim, theta, device=None):
    """cos, sin of shape (seq_len, head_dim) for rotate-half RoPE (the Hugging Face layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, n_head, T, head_dim); cos/sin: (T, head_dim) broadcast over batch and heads
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def explicit_attention(q, k, v, mask=None, is_causal=False):
    """softmax(q k^T / sqrt(d) [masked]) v, as F.scaled_dot_product_attention computes it (is_causal: the top-left
    triangle; mask: True = may attend; k, v may have fewer heads, shared in groups). On CPU in bf16 it is faster
    than SDPA's flash kernel up to ~512 keys (docs/experiments.md). Scores stay in the inputs' dtype: the scaling
    is applied to q (T x d, not T x T), and PyTorch's softmax accumulates in fp32 inside."""
    if k.size(1) != q.size(1):
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    scores = (q * q.size(-1) ** -0.5) @ k.transpose(-2, -1)
    if is_causal:
        causal = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return scores.softmax(-1) @ v


def mrope_table(positions, head_dim, theta, section):
    """Qwen3-VL's interleaved multimodal RoPE: positions (3, B, T) = (temporal, height, width) ids
    -> cos, sin (B, 1, T, head_dim). Frequency j of the head_dim / 2 turns with the height id when
    j % 3 == 1 and j < 3 * section[1], with the width id when j % 3 == 2 and j < 3 * section[2], and
    with the temporal id otherwise. Text tokens have t = h = w, which makes this plain RoPE."""
    j = torch.arange(head_dim // 2, device=positions.device)
    axis = torch.zeros_like(j)
    axis[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * section[2])] = 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.float()[axis].permute(1, 2, 0) * inv_freq  # (B, T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def vision_rope_table(grid, head_dim, theta):
    """2-D RoPE of a grid x grid patch tower (Qwen3-VL), patches in raster order -> cos, sin (P, head_dim):
    the first quarter of the frequencies turns with the patch's row, the second with its column
    (each quarter with theta's frequencies over head_dim / 2), repeated for rotate-half."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)))
    k = torch.arange(grid * grid)
    angles = torch.cat([torch.outer((k // grid).float(), inv_freq), torch.outer((k % grid).float(), inv_freq)], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class KVCache:
    """Preallocated keys/values for every layer; `pos` is how many positions are filled.

    Used for token-by-token generation and (stage 3) for the VLA prefix that every denoising
    step re-reads. The model advances `pos` after all layers have written the new positions.
    """

    def __init__(self, n_layer, batch_size, n_kv_head, head_dim, max_len, device, dtype):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer, k, v):
        """Write k, v (B, n_kv_head, T, head_dim) at [pos, pos+T); return all keys/values so far."""
        T = k.size(2)
        if self.pos + T > self.k.size(3):
            raise ValueError(f"KV cache overflow: {self.pos + T} positions > cache length {self.k.size(3)}")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


class Attention(nn.Module):
    def __init__(self, n_embd, n_head, n_kv_head, head_dim, qk_norm, eps, bias=False):
        super().__init__()
        assert n_head % n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.q_proj = nn.Linear(n_embd, n_head * head_dim, bias=bias)
        self.k_proj = nn.Linear(n_embd, n_kv_head * head_dim, bias=bias)
        self.v_proj = nn.Linear(n_embd, n_kv_head * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_head * head_dim, n_embd, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def forward(self, x, rope, mask=None, causal=True, kv_cache=None, layer=0, prefix_kv=None):
        """x: (B, T, C). rope: (cos, sin) for these T positions, or None (no RoPE).
        prefix_kv: optional (k, v), each (B, n_kv_head, T_prefix, head_dim), placed before this
        call's own keys/values (stage 3: the action expert reads a VLM layer's prefix this way).

        Attention paths, fastest first (FlashAttention on GPU needs no explicit mask):
          mask None, causal      -> SDPA is_causal=True    (LLM training, prefill)
          mask None, not causal  -> SDPA with no mask      (ViT, bidirectional)
          mask given             -> SDPA with a bool mask  (True = may attend), e.g. the VLA prefix
        With a cache, a single new token attends to everything cached (no mask needed); several new
        tokens after a non-empty cache need the caller's mask (the causal diagonal is offset).
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        is_causal = causal and mask is None
        if kv_cache is not None:
            if kv_cache.pos > 0 and is_causal:
                if T > 1:
                    raise ValueError("several new tokens after a filled KV cache need an explicit mask")
                is_causal = False  # one new token: it may see every cached position
            k, v = kv_cache.update(layer, k, v)
        if prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
        # on CPU in bf16, up to ~512 keys, SDPA's kernel is 1.4-6x slower than the explicit product (bench.py)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.size(2) <= 512:
            y = explicit_attention(q, k, v, mask, is_causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, n_embd, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2, with biases: SigLIP's MLP."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.fc1 = nn.Linear(n_embd, hidden)
        self.fc2 = nn.Linear(hidden, n_embd)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block, shared by the LLM, the ViT and the action expert.

    The defaults are the Llama/Qwen3 block (RMSNorm, SwiGLU, no biases). A pretrained SigLIP tower
    differs only in three settings, so they are arguments here rather than another class:
    norm='layer' (LayerNorm with bias), mlp='gelu_tanh' (GeluMLP) and bias=True (attention biases)."""

    def __init__(self, n_embd, n_head, n_kv_head, head_dim, mlp_hidden, qk_norm=True, eps=1e-6,
                 norm="rms", mlp="swiglu", bias=False):
        super().__init__()
        if norm not in ("rms", "layer") or mlp not in ("swiglu", "gelu_tanh"):
            raise ValueError(f"norm must be 'rms' or 'layer' and mlp 'swiglu' or 'gelu_tanh', got {norm!r}, {mlp!r}")
        make_norm = (lambda: RMSNorm(n_embd, eps)) if norm == "rms" else (lambda: nn.LayerNorm(n_embd, eps))
        self.input_layernorm = make_norm()
        self.self_attn = Attention(n_embd, n_head, n_kv_head, head_dim, qk_norm, eps, bias)
        self.post_attention_layernorm = make_norm()
        self.mlp = SwiGLU(n_embd, mlp_hidden) if mlp == "swiglu" else GeluMLP(n_embd, mlp_hidden)

    def forward(self, x, rope, mask=None, causal=True, kv_cache=None, layer=0, prefix_kv=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, causal, kv_cache, layer, prefix_kv)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------------------------
# Stage 1: the language model

class Transformer(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.n_embd)
        self.layers = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.mlp_hidden, c.qk_norm, c.norm_eps)
            for _ in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_table(c.max_seq_len, c.head_dim, c.rope_theta)
        # not persistent: derived from the config, so never stored in checkpoints
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Every tensor's initialisation, in one place:
          embed_tokens            normal(0, 0.02)
          q/k/v, gate/up proj     normal(0, 0.02)
          o_proj, down_proj       normal(0, 0.02 / sqrt(2 * n_layer))  (GPT-2: residual writes scaled
                                  so the stream's variance does not grow with depth)
          lm_head (untied)        normal(0, 0.02)
          RMSNorm weights         ones
        """
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)

    def rope(self, start, length):
        if start + length > self.rope_cos.size(0):
            raise ValueError(f"sequence of {start + length} positions > max_seq_len {self.rope_cos.size(0)}")
        return self.rope_cos[start:start + length], self.rope_sin[start:start + length]

    def rope_at(self, start, length, positions=None):
        """cos, sin for `length` positions from `start`, or for explicit Qwen3-VL positions (3, B, T)."""
        if positions is None:
            return self.rope(start, length)
        c = self.config
        return mrope_table(positions, c.head_dim, c.rope_theta, c.mrope_section)

    def forward(self, idx=None, targets=None, embeds=None, mask=None, kv_cache=None, return_hidden=False,
                positions=None, deepstack=None):
        """idx: (B, T) token ids, or embeds: (B, T, C) precomputed inputs (stage 2 scatters image
        embeddings into them). targets: (B, T) ids, -1 = no loss. Returns (logits, loss); loss is
        None without targets. With targets only the loss path runs the lm_head over all positions;
        without, the logits of every position are returned (generation slices the last).
        Qwen3-VL (VLM.llm_inputs makes both): positions (3, B, T) multimodal RoPE ids, and deepstack,
        a list of (B, T, C) added to the hidden states after layers 0, 1, ... (zero off the image).
        """
        x = self.embed_tokens(idx) if embeds is None else embeds
        start = kv_cache.pos if kv_cache is not None else 0
        rope = self.rope_at(start, x.size(1), positions)
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask=mask, causal=True, kv_cache=kv_cache, layer=i)
            if deepstack is not None and i < len(deepstack):
                x = x + deepstack[i]
        if kv_cache is not None:
            kv_cache.pos += x.size(1)
        x = self.norm(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def new_kv_cache(self, batch_size, max_len=None, dtype=None):
        c = self.config
        p = self.embed_tokens.weight
        return KVCache(c.n_layer, batch_size, c.n_kv_head, c.head_dim, max_len or c.max_seq_len,
                       p.device, dtype or p.dtype)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None, generator=None,
                 valid_vocab=None, embeds=None, positions=None, deepstack=None, step_embeds=None):
        """Sample continuations of idx (B, T) with a KV cache: one prefill pass, then one token per
        step. temperature 0 = greedy. Stops early when every row has produced stop_token.
        valid_vocab: the tokenizer's size; the embedding's padding rows are never sampled.
        embeds: (B, T, C) inputs for the prefill instead of idx's embeddings (stage 2: with images).
        step_embeds: ids so far (B, T') -> the last token's input (B, 1, C), instead of its embedding.
        positions, deepstack: Qwen3-VL's prefill inputs (forward); each new token's position is then
        the cache length + (the prompt's largest position + 1 - T), as transformers continues them."""
        B, T = idx.shape
        cache = self.new_kv_cache(B, min(T + max_new_tokens, self.config.max_seq_len))
        logits, _ = self(idx if embeds is None else None, embeds=embeds, kv_cache=cache, positions=positions,
                         deepstack=deepstack)
        delta = None if positions is None else positions.amax(dim=(0, 2)) + 1 - T  # (B,)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            next_token = sample_token(logits[:, -1, :valid_vocab], temperature, top_k, generator)
            out.append(next_token)
            if stop_token is not None:
                done |= next_token.squeeze(1) == stop_token
                if done.all():
                    break
            if cache.pos >= cache.k.size(3):
                break
            step_positions = None if delta is None else (cache.pos + delta).view(1, B, 1).expand(3, B, 1)
            step = None if step_embeds is None else step_embeds(torch.cat([idx] + out, dim=1))
            logits, _ = self(next_token if step is None else None, embeds=step, kv_cache=cache,
                             positions=step_positions)
        return torch.cat([idx] + out, dim=1)

    def num_params(self, exclude_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def estimate_flops(self, seq_len):
        """Training FLOPs per token (forward + backward), the PaLM/nanochat estimate:
            6 N  +  12 * n_layer * n_head * head_dim * seq_len
        N counts every weight used in a matmul: all parameters but the embedding lookup, plus the
        lm_head (which is the embedding matrix when tied). The second term is QK^T and AV
        (2 matmuls x 2 FLOPs x 3 for fwd+bwd), counted in full over the sequence as MFU
        conventions do, although causal attention only needs half of it."""
        c = self.config
        matrices = sum(p.numel() for p in self.parameters() if p.dim() == 2)  # a tied lm_head counts once
        n = matrices if c.tie_embeddings else matrices - self.embed_tokens.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len


def sample_token(logits, temperature=1.0, top_k=None, generator=None):
    """logits (B, V) -> (B, 1) token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


# -----------------------------------------------------------------------------------------------
# Weights on disk: model.safetensors (+ config.json written by the caller)

class WeightsError(ValueError):
    """A weight file that does not fit the model (or cannot be read: UnreadableWeights); the message
    is one line naming the file and what was expected (the CLIs print it and exit with code 2)."""


class UnreadableWeights(WeightsError):
    """Not a safetensors file (a renamed pickle), truncated, or missing."""


def save_weights(model, path):
    """Write the (uncompiled) model's weights as safetensors. Tied weights are stored once."""
    from safetensors.torch import save
    state = model.state_dict()
    seen, tensors = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape)
        if key in seen:  # a tied alias (lm_head.weight = embed_tokens.weight): stored once
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    _write_synced(path, save(tensors))


def load_weights(model, path, strict=True):
    """Load safetensors into model; tied aliases missing from the file are fine. Returns the
    names in the file the model does not have (strict=False), e.g. when growing a model.
    safetensors holds raw tensors only: reading one never runs code (unlike a pickle)."""
    from safetensors.torch import load_file
    try:
        tensors = load_file(path)
    except Exception as e:  # SafetensorError, OSError: not safetensors (a renamed pickle), truncated, missing
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UnreadableWeights(f"{path} is not a readable safetensors file (truncated, or another format?): {detail}") from None
    expected = model.state_dict()
    for name, t in tensors.items():
        if name in expected and t.shape != expected[name].shape:
            raise WeightsError(f"{path}: {name} has shape {list(t.shape)}, the configured model expects "
                               f"{list(expected[name].shape)}")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {n for n in missing if _is_tied_alias(model, n)}
    missing = [n for n in missing if n not in tied]
    if strict and (missing or unexpected):
        raise WeightsError(f"weights in {path} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return missing, unexpected


def _is_tied_alias(model, name):
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(name)
    return p is not None and any(q is p and n != name for n, q in params.items())


def save_config(path, **sections):
    """config.json: one JSON object of named sections (model, train, tokenizer, ...)."""
    out = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in sections.items()}
    _write_synced(path, json.dumps(out, indent=2).encode())


def _write_synced(path, data):
    """Write bytes flushed and fsync'ed: complete on disk before the caller renames its directory."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def load_llm(ckpt_dir, map_location="cpu"):
    """A stage-1 Transformer from a checkpoint directory (config.json + model.safetensors)."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    model = Transformer(config_from_dict(GPTConfig, cfg["model"]))
    load_weights(model, os.path.join(ckpt_dir, "model.safetensors"))
    return model.to(map_location), cfg


# ----- Stage 2: vision tower, projector, vision-language model -----

@dataclass
class VisionConfig:
    image_size: int = 64          # square input resolution (data.py resizes and pads to it)
    patch_size: int = 8           # (image_size / patch_size)^2 patches per image
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    head_dim: int = 32
    mlp_hidden: int = 384         # SwiGLU inner width
    pixel_shuffle: int = 2        # the projector folds s x s neighbouring patches into one visual token
    projector_hidden: int = 512   # projector MLP width
    qk_norm: bool = True
    norm_eps: float = 1e-6
    # Block variants (model.Block) and projector kind; the defaults are ours, hf.py sets SigLIP's
    norm: str = "rms"             # 'rms' | 'layer' (LayerNorm with bias, SigLIP)
    mlp: str = "swiglu"           # 'swiglu' | 'gelu_tanh' (SigLIP's fc1 -> GELU(tanh) -> fc2)
    bias: bool = False            # biases in the attention projections (SigLIP)
    projector: str = "mlp"        # 'mlp' (linear -> GELU -> linear) | 'linear' (one bias-free linear: Idefics3/SmolVLM)
    pixel_mean: tuple = (0.5, 0.5, 0.5)  # per-channel statistics of the training images (train_vlm.py
    pixel_std: tuple = (0.5, 0.5, 0.5)   # measures them): inputs are standardized inside the tower
    # Qwen3-VL's tower (hf.py sets these; the defaults leave our tower and SigLIP's unchanged)
    temporal_patch_size: int = 1  # 2: a Conv3d patch embedding over frame pairs; a still image is the pair of
                                  # two identical frames, i.e. a Conv2d with the two temporal kernels summed
    position_grid: int = 0        # side of the learned position table; 0 = the patch grid. Otherwise the
                                  # table is resized to the grid bilinearly (align_corners, as transformers)
    rope_theta: float = 0.0       # > 0: 2-D rotary positions (row, column) in every tower block
    deepstack_layers: tuple = ()  # tower layers whose features (own projectors) are added to the LLM's
                                  # hidden states at the image's positions after LLM layers 0, 1, ... (DeepStack)
    stem: str = "patch"           # 'patch': one stride-patch convolution (SigLIP); 'conv': stride-2 3x3 convolutions
                                  # down to the patch grid, ReLU between (early convolutions)
    coord_channels: bool = False  # two more input channels holding each pixel's x and y in [-1, 1] (CoordConv)
    film_vocab: int = 0           # > 0: the prompt's words scale and shift every stem layer's channels (FiLM), read
                                  # from a bag-of-words table of this many rows (the LLM's vocab_size); 0 = off
    answer_keypoints: int = 0     # > 0: at each <|assistant|>, this many keypoints over the patches, aimed by that
                                  # turn's question words (AnswerKeypoints); their features join its input
    answer_vocab: int = 0         # rows of AnswerKeypoints' word tables (the LLM's vocab_size)
    answer_pairs: bool = False    # AnswerKeypoints also hand over |dx|, |dy|, distance and signs of dx, dy of every
                                  # keypoint pair (relations: left of / above / in the bowl need them)
    answer_glimpse: int = 0       # > 0: AnswerKeypoints also read a square of this many pixels of the image around each
                                  # keypoint through a small CNN (shapes, fingers: finer than one patch); 0 = off
    answer_glimpse_grey: bool = False  # the glimpse sees brightness only (its pixels' mean over the colour channels)
    answer_glimpse_dense: bool = False  # the glimpse's CNN runs once over the whole image, its features max-pooled per
                                        # patch and pooled with each keypoint's weights (no crops: cheap at every token)
    answer_every_token: bool = False  # AnswerKeypoints also read at every answer token, aimed by the turn's words so far
                                      # (a caption's "red" aims them at the red object to name its shape)
    answer_summary: int = 0       # > 0: AnswerKeypoints also hand over this many features, each the max over the
                                  # patches of a linear map of them (which colours, kinds the image holds)
    answer_near: bool = False     # AnswerKeypoints 1.. also prefer patches near keypoint 0, as much as the question's
                                  # words ask ("the object nearest the gripper"); off for old checkpoints
    answer_offsets: bool = False  # each patch also says where within itself its thing lies (a linear map of its
                                  # features), so keypoint places are finer than the patch grid ("in the bowl")
    answer_fine: bool = False     # AnswerKeypoints aim over a grid twice as fine as the patches (stem='conv'): each
                                  # cell is its patch's tower features plus a linear map of the stem's last-but-one
                                  # map there
    fact_outputs: int = 0         # > 0: the projector also holds a linear read-out of this many facts per visual token,
                                  # trained by stage 2's dense loss on what each cell shows (train_vlm.py --cell_facts)

    @property
    def stem_widths(self):  # output channels of each stem layer
        if self.stem == "patch":
            return [self.n_embd]
        n_down = self.patch_size.bit_length() - 1
        return [min(32 << k, self.n_embd) for k in range(n_down - 1)] + [self.n_embd]

    @property
    def grid(self):  # patches per side
        return self.image_size // self.patch_size

    @property
    def answer_grid(self):  # cells per side of what AnswerKeypoints aim over
        return self.grid * (2 if self.answer_fine else 1)

    @property
    def n_visual_tokens(self):  # LLM positions per image
        return (self.grid // self.pixel_shuffle) ** 2


class VisionTower(nn.Module):
    """ViT without a CLS token: images (B, 3, H, W) in [0, 1] -> patch features (B, n_patches, n_embd).

    Pixels are standardized with the training images' channel statistics (train_vlm.py measures
    them; the defaults give SigLIP's (x - 0.5) / 0.5), so a uniform tabletop does not leave a large
    constant offset and a small object contrast. Patch embedding
    is a stride-patch convolution (a linear map of each patch, as in SigLIP), plus learned absolute
    positions; the blocks are the LLM's Block run bidirectionally (causal=False, no RoPE, no mask:
    SDPA's fastest path)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = c = config
        if c.image_size % c.patch_size or c.grid % c.pixel_shuffle:
            raise ValueError(f"image_size {c.image_size} must be a multiple of patch_size {c.patch_size}, and the "
                             f"{c.grid} x {c.grid} patch grid a multiple of pixel_shuffle {c.pixel_shuffle}")
        in_channels = 3 + 2 * c.coord_channels
        if c.temporal_patch_size > 1:  # Qwen3-VL: weights (n_embd, 3, frames, patch, patch)
            self.patch_embedding = nn.Conv3d(in_channels, c.n_embd, (c.temporal_patch_size, c.patch_size, c.patch_size))
        elif c.stem == "patch":
            self.patch_embedding = nn.Conv2d(in_channels, c.n_embd, c.patch_size, stride=c.patch_size)
        elif c.stem == "conv":
            if c.patch_size & (c.patch_size - 1):
                raise ValueError(f"stem='conv' halves the resolution per layer: patch_size {c.patch_size} must be a power of 2")
            widths = c.stem_widths
            self.conv_stem = nn.ModuleList(nn.Conv2d(w_in, w_out, 3, stride=2, padding=1)
                                           for w_in, w_out in zip([in_channels] + widths, widths))
        else:
            raise ValueError(f"unknown stem {c.stem!r}: use 'patch' or 'conv'")
        if c.answer_fine:  # the stem's map at twice the patch grid, in the tower's width
            if c.stem != "conv" or c.patch_size < 4:
                raise ValueError("answer_fine reads the conv stem's last-but-one map: it needs stem='conv' and "
                                 "patch_size >= 4")
            self.fine = nn.Linear(c.stem_widths[-2], c.n_embd)
        if c.film_vocab:  # per token: a (scale, shift) pair for every stem channel; zeros = no conditioning
            self.film = nn.Embedding(c.film_vocab, 2 * sum(c.stem_widths))
        side = c.position_grid or c.grid
        self.position_embedding = nn.Parameter(torch.zeros(side * side, c.n_embd))
        if c.rope_theta > 0:
            cos, sin = vision_rope_table(c.grid, c.head_dim, c.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.layers = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.n_head, c.head_dim, c.mlp_hidden, c.qk_norm, c.norm_eps, c.norm, c.mlp, c.bias)
            for _ in range(c.n_layer))
        self.post_layernorm = RMSNorm(c.n_embd, c.norm_eps) if c.norm == "rms" else nn.LayerNorm(c.n_embd, c.norm_eps)
        self.register_buffer("pixel_mean", torch.tensor(c.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(c.pixel_std).view(3, 1, 1), persistent=False)

    def positions(self):
        """The learned position table at the patch grid: (grid * grid, C)."""
        c, table = self.config, self.position_embedding
        side = c.position_grid or c.grid
        if side == c.grid:
            return table
        table = table.view(1, side, side, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(c.grid, c.grid), mode="bilinear", align_corners=True)
        return table.permute(0, 2, 3, 1).reshape(c.grid * c.grid, -1)

    def standardize(self, images):
        """Pixels as the tower reads them: per-channel (images - pixel_mean) / pixel_std."""
        return (images - self.pixel_mean) / self.pixel_std

    def forward(self, images, prompt=None, return_layers=False):
        """prompt: (ids (B, T), mask (B, T) bool) of the words that condition the stem (FiLM), or None.
        return_layers: also the hidden states after each of config.deepstack_layers (a list) and, with answer_fine,
        the cells of the grid twice as fine (B, 4 * n_patches, n_embd), row-major (else None)."""
        images = self.standardize(images)
        c = self.config
        if c.coord_channels:
            B, _, H, W = images.shape
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, H, device=images.device),
                                    torch.linspace(-1, 1, W, device=images.device), indexing="ij")
            images = torch.cat([images, torch.stack([xs, ys]).to(images.dtype).expand(B, 2, H, W)], dim=1)
        film = None
        if c.film_vocab:
            if prompt is None:
                raise ValueError("this vision tower is conditioned on its prompt (film_vocab > 0): pass prompt=(ids, mask)")
            ids, mask = prompt
            mask = mask.unsqueeze(-1).to(self.film.weight.dtype)
            film = (self.film(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, 2 * sum(stem_widths)): mean over words
            film = film.split([w for w in c.stem_widths for _ in range(2)], dim=1)
        if c.temporal_patch_size > 1:  # a still image = identical frames: sum the temporal kernels
            stem = [lambda x: F.conv2d(x, self.patch_embedding.weight.sum(2), self.patch_embedding.bias,
                                       stride=c.patch_size)]
        else:
            stem = [self.patch_embedding] if c.stem == "patch" else list(self.conv_stem)
        x = images
        for k, conv in enumerate(stem):
            x = conv(x)
            if film is not None:  # FiLM: (1 + scale) * x + shift, per channel
                x = x * (1 + film[2 * k])[:, :, None, None] + film[2 * k + 1][:, :, None, None]
            if c.stem == "conv" and k < len(stem) - 1:
                x = F.relu(x)
                before_last = x
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, C), row-major patches
        x = x + self.positions()
        rope = (self.rope_cos, self.rope_sin) if c.rope_theta > 0 else None
        layers = []
        for i, block in enumerate(self.layers):
            x = block(x, rope, causal=False)
            if i in c.deepstack_layers:
                layers.append(x)
        x = self.post_layernorm(x)
        if not return_layers:
            return x
        fine = None
        if c.answer_fine:  # each patch's features in its four cells, plus what the stem saw in each cell
            B, g = x.size(0), c.grid
            fine = x.view(B, g, 1, g, 1, -1).expand(B, g, 2, g, 2, x.size(-1)).reshape(B, 4 * g * g, -1)
            fine = fine + self.fine(before_last.flatten(2).transpose(1, 2))
        return x, layers, fine


class Projector(nn.Module):
    """Pixel shuffle, then an MLP into the LLM width: (B, n_patches, C_vit) -> (B, n_visual_tokens, C_llm).

    Pixel shuffle (space-to-depth) stacks each s x s block of neighbouring patches into one token
    of s^2 x the channels: s^2 fewer positions for the LLM to attend over, no feature dropped.
    The stacked channels are ordered (row in block, column in block, channel), tokens row-major:
    the order of Idefics3/SmolVLM's pixel_shuffle, so their connector (projector='linear', one
    bias-free linear layer) loads as is."""

    def __init__(self, config: VisionConfig, llm_width, shuffled_norm=False):
        super().__init__()
        self.config = c = config
        if c.projector not in ("mlp", "linear"):
            raise ValueError(f"projector must be 'mlp' or 'linear', got {c.projector!r}")
        # shuffled_norm: a LayerNorm over the stacked channels first (Qwen3-VL's DeepStack projectors)
        self.norm = nn.LayerNorm(c.n_embd * c.pixel_shuffle ** 2, c.norm_eps) if shuffled_norm else None
        if c.deepstack_layers and not shuffled_norm:  # Qwen3-VL: one more projector per DeepStack layer, kept
            # here so the projector's optimizer group, learning rate and parameter count include them
            self.deepstack = nn.ModuleList(Projector(c, llm_width, shuffled_norm=True) for _ in c.deepstack_layers)
        if c.projector == "linear":
            self.linear = nn.Linear(c.n_embd * c.pixel_shuffle ** 2, llm_width, bias=False)
        else:
            self.linear_1 = nn.Linear(c.n_embd * c.pixel_shuffle ** 2, c.projector_hidden)
            self.linear_2 = nn.Linear(c.projector_hidden, llm_width)
        if c.fact_outputs and not shuffled_norm:  # visual token -> its cell's facts (a training signal, unused after)
            self.facts = nn.Linear(llm_width, c.fact_outputs)
        if c.answer_keypoints and not shuffled_norm:  # kept here: the projector's optimizer group and learning rate
            self.answer_keypoints = AnswerKeypoints(c.answer_vocab, c.n_embd, c.answer_grid, llm_width,
                                                    c.answer_keypoints,
                                                    pairs=c.answer_pairs, glimpse=c.answer_glimpse,
                                                    glimpse_grey=c.answer_glimpse_grey,
                                                    glimpse_dense=c.answer_glimpse_dense, near=c.answer_near,
                                                    recency=c.answer_every_token, summary=c.answer_summary,
                                                    offsets=c.answer_offsets)

    def forward(self, x):
        B, _, C = x.shape
        g, s = self.config.grid, self.config.pixel_shuffle
        x = x.view(B, g // s, s, g // s, s, C).permute(0, 1, 3, 2, 4, 5)  # (B, rows, cols, s, s, C)
        x = x.reshape(B, (g // s) ** 2, s * s * C)
        if self.norm is not None:
            x = self.norm(x)
        if self.config.projector == "linear":
            return self.linear(x)
        return self.linear_2(F.gelu(self.linear_1(x)))


class AnswerKeypoints(nn.Module):
    """Keypoints aimed by a question, read where its answer starts (train_vlm.py --answer_keypoints).

    At each <|assistant|> position, keypoint k pools that turn's question words (between <|user|> and it)
    with weights a_tk = softmax over the words t of weight_k[word_t] + order_k[t's place in the question];
    its query q_k = sum_t a_tk query_k[word_t] says what to look for. A softmax over the image's patches of
    exp(sharpness_k) * patch . q_k (a spatial soft-argmax, as stage 3's language keypoints; the learned
    sharpness lets a keypoint focus before its query table has grown) gives the expected (x, y) and the
    pooled patch features, and one linear layer adds all keypoints' to the answer position's input; with
    pairs, also each keypoint pair's |dx|, |dy|, distance and signs of (dx, dy): the nonlinear pieces of "left
    of", "above" and region answers, which the decoder was slow to learn from x, y alone (docs/stage2.md). Options
    (train_vlm.py turns them all on; what each gave: docs/stage2.md): glimpse, a small
    CNN over the pixels around each keypoint (grey: from brightness only; dense: the CNN once over the image,
    max-pooled per patch); near, a pull of keypoints 1.. towards keypoint 0 as strong as the question's words ask;
    every token, a read-out at each answer token too, aimed by the turn's words up to it, each word also weighted
    by how far back it lies (generation re-aims them at every new token); summary, features max-pooled over the
    patches (what the image holds: a caption's next colour). The glimpse and summary read the first image only
    (stage 2's one camera).
    Matching a word against the patches is one dot product, so "what colour is the bowl at the top?" needs
    no attention circuit in the decoder to find the bowl first (docs/stage2.md). In stage 3 the prompt
    ends with <|assistant|> too: there the instruction aims them."""

    def __init__(self, vocab_size, patch_dim, grid, n_embd, keypoints, max_words=32, pairs=False, glimpse=0,
                 glimpse_width=64, glimpse_grey=False, glimpse_dense=False, near=False, recency=False, summary=0,
                 offsets=False):
        super().__init__()
        self.keypoints, self.patch_dim, self.max_words, self.grid = keypoints, patch_dim, max_words, grid
        self.pairs = torch.triu_indices(keypoints, keypoints, 1).tolist() if pairs else None  # [[k...], [l...]], k < l
        self.query = nn.Embedding(vocab_size, patch_dim * keypoints)  # what each word looks for, per keypoint
        self.weight = nn.Embedding(vocab_size, keypoints)              # how much each word counts, per keypoint
        self.order = nn.Parameter(torch.zeros(max_words, keypoints))   # ... and its place in the question
        self.sharpness = nn.Parameter(torch.zeros(keypoints))          # log scale of the patch scores: a keypoint can
                                                                       # grow sharp faster than its query table grows
        self.near = nn.Embedding(vocab_size, keypoints) if near else None  # how strongly each word pulls keypoints 1..
                                                                           # towards keypoint 0
        # read at every answer token: each word also counts by how far back it lies (the latest colour named)
        self.recency = nn.Parameter(torch.zeros(max_words, keypoints)) if recency else None
        self.summary = nn.Linear(patch_dim, summary) if summary else None  # max-pooled: what the image holds
        self.offset = nn.Linear(patch_dim, 2) if offsets else None  # where in its patch a patch's thing lies (x, y)
        n_pairs = keypoints * (keypoints - 1) // 2 if pairs else 0
        self.glimpse_size, self.glimpse_grey, self.glimpse_dense = glimpse, glimpse_grey, glimpse_dense
        if glimpse:  # three 3x3 convolutions, then the max over the square: where in it a detail lies does not matter
            w = glimpse_width
            self.glimpse = nn.Sequential(nn.Conv2d(1 if glimpse_grey else 3, w // 2, 3, padding=1), nn.ReLU(),
                                         nn.Conv2d(w // 2, w // 2, 3, stride=2, padding=1), nn.ReLU(),
                                         nn.Conv2d(w // 2, w, 3, padding=1), nn.ReLU())
        self.out = nn.Linear(keypoints * (patch_dim + 2 + (glimpse_width if glimpse else 0)) + 5 * n_pairs + summary,
                             n_embd)
        k = torch.arange(grid * grid)  # raster order: patch k at column k % grid, row k // grid, in [-1, 1]
        self.register_buffer("xy", torch.stack([k % grid, k // grid], -1).float() / max(grid - 1, 1) * 2 - 1,
                             persistent=False)

    def forward(self, idx, patches, words, turn, answer, images=None, return_attention=False):
        """idx (B, T); patches (B, P, patch_dim) (all of a row's images, in order); words, answer (B, T) bool:
        question words and answer starts; turn (B, T): each token's turn number; images (B, n_images, 3, H, W)
        standardized (for the glimpse) -> (B, T, n_embd), zero but at answers.
        return_attention: also {"patches": (B, A, P, K) each keypoint's softmax over the patches at the row's A
        answers (in order; `valid` (B, A) marks real ones), "words": (B, A, T) bool, the question words each read,
        "xy": (B, A, K, 2) each keypoint's place in [-1, 1] (x right, y down)}."""
        B, T = idx.shape
        n_answers = answer.sum(1)
        A = int(n_answers.max())
        at = torch.argsort((~answer).to(torch.int8), dim=1, stable=True)[:, :A]  # (B, A): answer positions first
        valid = torch.arange(A, device=idx.device)[None] < n_answers[:, None]
        position = torch.arange(T, device=idx.device)
        asks = words[:, None, :] & (turn.gather(1, at)[:, :, None] == turn[:, None, :]) & (position <= at[:, :, None])
        logits = (self.weight(idx).float() + self.order[self.place_in_turn(words, turn)])[:, None]  # (B, 1, T, K)
        if self.recency is not None:  # (B, A, T, K)
            logits = logits + self.recency[(at[:, :, None] - position).clamp(0, self.max_words - 1)]
        a = logits.masked_fill(~asks[..., None], -1e9).softmax(dim=2)  # (B, A, T, K)
        query = self.query(idx).view(B, T, self.patch_dim, self.keypoints).float()
        # (B, A, K, P) throughout: each keypoint's scores over the patches contiguous, so the products are plain
        # batched matmuls and the softmax runs along memory (a (B, A, P, K) layout cost copies at 256 patches)
        q = torch.einsum("batk,btck->bakc", a, query)
        patches32 = patches.float()
        P = patches.size(1)
        scores = (q.flatten(1, 2) @ patches32.transpose(1, 2)).view(B, A, self.keypoints, P)
        scores = scores * self.sharpness.exp()[:, None]
        grid_xy = self.xy.repeat(P // len(self.xy), 1)[None].expand(B, -1, -1)  # (B, P, 2): each image's own grid
        if self.offset is not None:  # up to half a patch's spacing either way: finer places than the grid
            grid_xy = grid_xy + torch.tanh(self.offset(patches).float()) / max(self.grid - 1, 1)
        if self.near is not None:  # nearest = best match minus a distance cost; the question's words set the cost
            # x10: the table's rows learn 10x faster; -4: the pull starts near 0 (softplus(-4) = 0.018)
            pull = F.softplus(10 * torch.einsum("batk,btk->bak", a, self.near(idx).float()) - 4)  # (B, A, K)
            pull = pull * (torch.arange(self.keypoints, device=idx.device) > 0)  # keypoint 0 is the anchor
            anchor = scores[:, :, 0].softmax(dim=-1) @ grid_xy  # (B, A, 2)
            distance2 = (grid_xy[:, None] - anchor[:, :, None]).square().sum(-1)  # (B, A, P)
            scores = scores - pull[..., None] * distance2[:, :, None]
        w = scores.softmax(dim=-1)  # (B, A, K, P)
        xy = (w.flatten(1, 2) @ grid_xy).view(B, A, self.keypoints, 2)
        features = (w.flatten(1, 2) @ patches32).view(B, A, self.keypoints, -1)
        read = [features, xy]
        if self.glimpse_size:  # the glimpse and the summary read the first image: the one camera stage 2 trained on
            glimpses = self.dense_glimpses if self.glimpse_dense else self.glimpses
            read.append(glimpses(images[:, :1].float(), w[..., :self.grid ** 2]))
        read = [torch.cat(read, -1).flatten(2)]  # (B, A, K * (patch_dim + 2 [+ glimpse_width])): per keypoint
        if self.pairs:  # d (B, A, n_pairs, 2): where keypoint l lies from keypoint k
            d = xy[:, :, self.pairs[1]] - xy[:, :, self.pairs[0]]
            read.append(torch.cat([d.abs(), d.norm(dim=-1, keepdim=True), d.sign()], -1).flatten(2))  # norm: grad 0 at 0
        if self.summary is not None:
            read.append(self.summary(patches[:, :self.grid ** 2]).float().amax(1)[:, None].expand(B, A, -1))
        out = self.out(torch.cat(read, -1).to(patches.dtype)) * valid[..., None]  # (B, A, n_embd)
        out = out.new_zeros(B, T, out.size(-1)).scatter_add(  # out is bf16 under autocast
            1, at[..., None].expand_as(out), out)
        if not return_attention:
            return out
        return out, {"patches": w.transpose(2, 3), "words": asks, "valid": valid, "at": at, "xy": xy}

    def glimpses(self, images, w):
        """images (B, N, 3, H, W), w (B, A, K, P) -> (B, A, K, glimpse_width): the CNN's features of a square of
        glimpse_size pixels centred where each keypoint points in each image, weighted by its share of its mass
        over these images."""
        if self.glimpse_grey:
            images = images.mean(2, keepdim=True)
        B, N, C, H, W = images.shape
        A, K, G, g = w.size(1), self.keypoints, self.glimpse_size, self.grid
        xy, mass = (x.transpose(2, 3) for x in self.places_per_image(w))  # (B, A, N, K, 2), (B, A, N, K)
        centre = ((xy + 1) * (g - 1) / 2 + 0.5) / g * 2 - 1  # patch-centre coordinates -> grid_sample's (pixel edges)
        offset = (torch.arange(G, device=w.device) - (G - 1) / 2) * 2
        offset = torch.stack(torch.meshgrid(offset / W, offset / H, indexing="xy"), -1)  # (G, G, 2) as (x, y)
        grid = centre.permute(0, 2, 1, 3, 4).reshape(B * N, A * K, 1, 1, 2) + offset  # (B*N, A*K, G, G, 2)
        crops = F.grid_sample(images.flatten(0, 1), grid.flatten(1, 2), align_corners=False)  # (B*N, C, A*K*G, G)
        crops = crops.view(B * N, C, A * K, G, G).transpose(1, 2).flatten(0, 1)  # (B*N*A*K, C, G, G)
        f = self.glimpse(crops.to(self.glimpse[0].weight.dtype))
        f = f.amax((-2, -1)).float().view(B, N, A, K, -1).transpose(1, 2)  # (B, A, N, K, F)
        return (f * (mass / mass.sum(2, keepdim=True).clamp(min=1e-9))[..., None]).sum(2)

    def places_per_image(self, w):
        """w (..., K, n_images * cells): keypoints' weights over all the row's images -> (places (..., K, n_images, 2):
        the expected place under the weights restricted to each image, mass (..., K, n_images): their sum there)."""
        w = w.unflatten(-1, (-1, len(self.xy)))
        mass = w.sum(-1)
        return (w @ self.xy) / mass.clamp(min=1e-9)[..., None], mass

    def dense_glimpses(self, images, w):
        """images (B, 1, 3, H, W), w (B, A, K, P) over its patches -> (B, A, K, glimpse_width): the CNN over the whole
        image, max-pooled within each patch, pooled with each keypoint's weights there (renormalized: its share)."""
        images = images[:, 0].mean(1, keepdim=True) if self.glimpse_grey else images[:, 0]
        f = self.glimpse(images.to(self.glimpse[0].weight.dtype))
        f = F.adaptive_max_pool2d(f, self.grid).flatten(2).transpose(1, 2).float()  # (B, P, glimpse_width)
        return (w.flatten(1, 2) @ f).view(*w.shape[:3], -1) / w.sum(-1).clamp(min=1e-9)[..., None]

    def place_in_turn(self, words, turn):
        """(B, T): each word's index among its turn's words, capped at max_words - 1."""
        count = words.long().cumsum(1)
        start = torch.zeros_like(count).scatter_reduce(1, turn, count - words.long(), "amin", include_self=False)
        return (count - 1 - start.gather(1, turn)).clamp(0, self.max_words - 1)


class VLM(nn.Module):
    """Vision-language model: the stage-1 Transformer reading image embeddings in its token stream.

    Token layout of one turn (data.py writes it; each <|image|> is a placeholder for one visual token):

        <|endoftext|> <|user|> <|image|> x n_visual_tokens  question  <|assistant|> answer <|endoftext|>
                               └── replaced by projector(vision(image)) ──┘

    Several images (cameras, frames) are consecutive runs of placeholders, in the order of `images`.
    The whole sequence is causal, so it runs on SDPA's is_causal fast path. Submodules: `llm`
    (parameter names unchanged, so stage-1 weights load as llm.*), `vision`, `projector`."""

    def __init__(self, llm_config: GPTConfig, vision_config: VisionConfig, image_token_id, llm=None,
                 prompt_end_id=None, prompt_start_id=None, text_end_id=None, pad_id=None):
        super().__init__()
        if (vision_config.film_vocab or vision_config.answer_keypoints) and prompt_end_id is None:
            raise ValueError("a prompt-conditioned vision tower (film_vocab or answer_keypoints > 0) needs "
                             "prompt_end_id (<|assistant|>)")
        if vision_config.answer_keypoints and (prompt_start_id is None or vision_config.temporal_patch_size > 1):
            raise ValueError("answer_keypoints need prompt_start_id (<|user|>) and one of our towers")
        if vision_config.answer_every_token and text_end_id is None:
            raise ValueError("answer_every_token needs text_end_id (<|endoftext|>): where each answer ends")
        self.prompt_end_id = prompt_end_id  # the words before its first occurrence condition the tower (FiLM)
        self.prompt_start_id = prompt_start_id  # each turn's question starts after it (answer_keypoints)
        self.text_end_id = text_end_id  # each turn's answer ends with it (answer_every_token)
        self.pad_id = pad_id  # right padding: after a row's last answer, never read at (None: rows are not padded)
        self.llm = llm if llm is not None else Transformer(llm_config)
        self.vision = VisionTower(vision_config)
        self.projector = Projector(vision_config, llm_config.n_embd)
        self.image_token_id = image_token_id
        self.n_visual_tokens = vision_config.n_visual_tokens  # LLM positions per image
        self.init_vision_weights()

    @property
    def config(self):  # the LLM's config: width, layers, heads (what stage 3 attends to)
        return self.llm.config

    @property
    def vision_config(self):
        return self.vision.config

    @torch.no_grad()
    def init_vision_weights(self):
        """The new parts only (the LLM comes pretrained):
          patch_embedding, q/k/v, gate/up, projector linears   normal(0, 0.02)
          o_proj, down_proj                                     normal(0, 0.02 / sqrt(2 * vision n_layer))
          position_embedding                                    normal(0, 0.02)
          conv_stem, answer glimpse conv weights                kaiming normal (ReLU gain): the signal keeps its scale
          film table                                            zeros (the stem starts unconditioned)
          fine (answer_fine's map of the stem)                  zeros (each cell starts as its patch)
          answer keypoints' sharpness, offset                   zeros (scores = patch . query; places at patch centres)
          biases zeros, RMSNorm weights ones
        """
        std = 0.02
        for name, p in [*self.vision.named_parameters(), *self.projector.named_parameters(prefix="projector")]:
            if name.startswith(("film.", "fine.")) or name.endswith(("sharpness", "answer_keypoints.offset.weight")):
                nn.init.zeros_(p)
            elif (name.startswith("conv_stem.") or ".glimpse." in name) and p.dim() > 1:
                nn.init.kaiming_normal_(p, nonlinearity="relu")
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.vision.config.n_layer))
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)

    def embed(self, idx, images, return_patches=False):
        """idx (B, T) with n_images * n_visual_tokens <|image|> placeholders per row, images
        (B, n_images, 3, H, W) float -> inputs (B, T, C): token embeddings, with each image's
        projected embeddings at its placeholders (row by row, images in order). return_patches: also
        the vision tower's patch features (B * n_images, n_patches, C_vit), which stage 3 reads."""
        inputs = self.llm_inputs(idx, images)
        return (inputs["embeds"], inputs["patches"]) if return_patches else inputs["embeds"]

    def mrope_positions(self, is_image):
        """Qwen3-VL's position ids (3, B, T) as transformers' get_rope_index computes them, each run of
        n_visual_tokens <|image|> tokens one image: a text token has t = h = w = the number of text
        tokens before it + g per image before it (g = merged grid side); an image token has t = that
        count at the image's start, h = t + its row, w = t + its column. (transformers takes a run of
        image tokens as one image: its template puts <|vision_start|>, <|vision_end|> around each.)"""
        g, n = self.vision.config.grid // self.vision.config.pixel_shuffle, self.n_visual_tokens
        img = is_image.long()
        image_before, text_before = img.cumsum(1) - img, (1 - img).cumsum(1) - (1 - img)
        base = text_before + image_before // n * g
        within = image_before % n
        return torch.stack([base, base + img * (within // g), base + img * (within % g)])

    def llm_inputs(self, idx, images):
        """What the LLM reads: {"embeds": (B, T, C) (see embed), "patches": the tower's features or None,
        "cells": what the answer keypoints aim over (the patches, or answer_fine's twice-finer grid), "positions":
        Qwen3-VL's (3, B, T) position ids or None (plain RoPE), "deepstack": a list of (B, T, C) (Qwen3-VL's
        DeepStack features at the image positions, zero elsewhere; [] for other towers), "keypoints": the
        answer keypoints' attention (AnswerKeypoints, return_attention) at each <|assistant|>, or None; with every-token
        reads its "every" holds their "patches", "valid", "at" and "xy" at every answer token}."""
        x = self.llm.embed_tokens(idx)
        is_image = idx == self.image_token_id  # (B, T)
        n_images = 0 if images is None else images.size(1)
        if not torch.compiler.is_compiling():  # a data error, checked eagerly (the data loader guarantees it)
            counts, want = is_image.sum(1).tolist(), n_images * self.n_visual_tokens
            bad = [r for r, n in enumerate(counts) if n != want]
            if bad:
                raise ValueError(f"row {bad[0]} has {counts[bad[0]]} <|image|> placeholders, expected {n_images} "
                                 f"image(s) x {self.n_visual_tokens} visual tokens = {want}")
        positions = self.mrope_positions(is_image) if self.llm.config.mrope_section else None
        if n_images == 0:
            return {"embeds": x, "patches": None, "cells": None, "positions": positions, "deepstack": [],
                    "keypoints": None}
        prompt = None
        if self.vision.config.film_vocab:  # the first user turn's words (before <|assistant|>), for every image of the row
            words = ((idx == self.prompt_end_id).cumsum(1) == 0) & ~is_image
            prompt = (idx.repeat_interleave(n_images, 0), words.repeat_interleave(n_images, 0))
        # (B * n_images, n_patches, C_vit), and the DeepStack layers' hidden states
        patches, layers, fine = self.vision(images.flatten(0, 1), prompt, return_layers=True)
        x = x.masked_scatter(is_image.unsqueeze(-1), self.projector(patches).to(x.dtype))
        answer, keypoints = idx == self.prompt_end_id, None
        cells = patches if fine is None else fine
        if self.vision.config.answer_keypoints and answer.any():  # every image's patches, one softmax over them all
            words, turn = self.question_words(idx)
            read_at = self.answer_tokens(idx, turn) if self.vision.config.answer_every_token else answer
            patches_by_row = cells.reshape(idx.size(0), -1, cells.size(-1))
            standardized = self.vision.standardize(images) if self.vision.config.answer_glimpse else None
            out, keypoints = self.projector.answer_keypoints(idx, patches_by_row, words, turn, read_at, standardized,
                                                             return_attention=True)
            x = x + out.to(x.dtype)
            if self.vision.config.answer_every_token:  # hand on the <|assistant|> positions' (grounding, pointing),
                every = {k: keypoints[k] for k in ("patches", "valid", "at", "xy")}  # and all (stage 2 grounds the named)
                keep = idx.gather(1, keypoints["at"]) == self.prompt_end_id  # (B, A), in order
                first = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :int(keep.sum(1).max())]
                rows = torch.arange(idx.size(0), device=idx.device)[:, None]
                keypoints = {k: keypoints[k][rows, first] for k in ("patches", "words", "at", "xy")}
                keypoints.update(valid=keep[rows, first] & every["valid"][rows, first], every=every)
        deepstack = [x.new_zeros(x.shape).masked_scatter(is_image.unsqueeze(-1), projector(h).to(x.dtype))
                     for projector, h in zip(self.projector.deepstack, layers)] if layers else []
        return {"embeds": x, "patches": patches, "cells": cells, "positions": positions, "deepstack": deepstack,
                "keypoints": keypoints}

    def question_words(self, idx):
        """(words, turn), both (B, T): the tokens AnswerKeypoints may pool (all but <|user|>, <|assistant|>, <|image|>)
        and each token's turn number (1 from the first <|user|> on)."""
        user = idx == self.prompt_start_id
        return ~(user | (idx == self.prompt_end_id) | (idx == self.image_token_id)), user.cumsum(1)

    def answer_tokens(self, idx, turn):
        """(B, T) bool: each turn's <|assistant|> and its answer's tokens, up to (not with) its <|endoftext|>. The row
        starts with <|endoftext|> and every turn before ends with one, so in turn k (from 1) k of them come before
        its answer and k + 1 after. The padding after a row's last answer (whose <|endoftext|> is only a target)
        is not an answer: nothing reads it, and it set the answer count of a short row's batch (up to half the
        positions of the built-in world's caption rows)."""
        assistants, ends = (idx == self.prompt_end_id).cumsum(1), (idx == self.text_end_id).cumsum(1)
        answers = (turn >= 1) & (assistants >= turn) & (ends <= turn)
        return answers if self.pad_id is None else answers & (idx != self.pad_id)

    def forward(self, idx, images, targets=None, return_extras=False):
        """idx, targets (B, T) (targets -1 = no loss: data.py keeps only answer tokens);
        images (B, n_images, 3, H, W). Returns (logits, loss): without targets the logits of every position
        (B, T, V) and None; with them only the N positions that have a target are projected to the vocabulary:
        logits (N, V) in row-major order and their mean cross-entropy. return_extras: also
        {"visual": the visual tokens the LLM read, (B, n_images * n_visual_tokens, C) in placeholder order,
        "patches": the tower's features (B * n_images, n_patches, C_vit) or None, "keypoints": the answer
        keypoints' attention (AnswerKeypoints, return_attention) or None, "hidden": the LLM's final normed
        states (B, T, C)}, for stage 2's dense losses."""
        inputs = self.llm_inputs(idx, images)
        hidden = self.llm(embeds=inputs["embeds"], positions=inputs["positions"], deepstack=inputs["deepstack"],
                          return_hidden=True)
        if targets is None:
            logits, loss = self.llm.lm_head(hidden), None
        else:  # only answer tokens have targets (1 position in 5 in the built-in world): only they reach the vocabulary
            keep = targets != -1
            logits = self.llm.lm_head(hidden[keep])
            loss = F.cross_entropy(logits.float(), targets[keep])
        if not return_extras:
            return logits, loss
        embeds = inputs["embeds"]
        visual = embeds[idx == self.image_token_id].view(idx.size(0), -1, embeds.size(-1))
        return logits, loss, {"visual": visual, "patches": inputs["patches"], "keypoints": inputs["keypoints"],
                              "hidden": hidden}

    @torch.no_grad()
    def generate(self, idx, images, max_new_tokens, temperature=1.0, top_k=None, stop_token=None,
                 generator=None, valid_vocab=None):
        """Continue prompts idx (B, T) about images: one prefill with the image embeddings into the
        KV cache, then token by token (Transformer.generate). Returns (B, T + new) ids."""
        inputs = self.llm_inputs(idx, images)
        step_embeds = None
        if self.vision.config.answer_every_token and inputs["keypoints"] is not None:  # each new token is read at too
            patches_by_row = inputs["cells"].reshape(idx.size(0), -1, inputs["cells"].size(-1))
            standardized = self.vision.standardize(images) if self.vision.config.answer_glimpse else None

            def step_embeds(ids):  # the keypoints over the whole sequence so far, read at its last token
                words, turn = self.question_words(ids)
                last = torch.zeros_like(ids, dtype=torch.bool)
                last[:, -1] = self.answer_tokens(ids, turn)[:, -1]
                if not last.any():  # every row has ended its answer
                    return self.llm.embed_tokens(ids[:, -1:])
                out = self.projector.answer_keypoints(ids, patches_by_row, words, turn, last, standardized)
                return self.llm.embed_tokens(ids[:, -1:]) + out[:, -1:].to(inputs["embeds"].dtype)
        return self.llm.generate(idx, max_new_tokens, temperature, top_k, stop_token, generator, valid_vocab,
                                 embeds=inputs["embeds"], positions=inputs["positions"], deepstack=inputs["deepstack"],
                                 step_embeds=step_embeds)

    def param_counts(self):
        return {"vision": sum(p.numel() for p in self.vision.parameters()),
                "projector": sum(p.numel() for p in self.projector.parameters()),
                "llm": self.llm.num_params()}

    def estimate_flops(self, seq_len, n_images=1):
        """Training FLOPs per sample (forward + backward) of seq_len tokens with n_images images:
            seq_len * llm.estimate_flops(seq_len)                          the LLM, every position
          + n_images * P * (6 N_vit + 12 * L_vit * n_head * head_dim * P)   the ViT over P patches
          + n_images * n_visual_tokens * 6 N_projector
        N_* count the weights used in matmuls (the conv patch embedding is one; positions are not)."""
        c = self.vision.config
        P = c.grid * c.grid
        n_vit = sum(p.numel() for n, p in self.vision.named_parameters()
                    if p.dim() >= 2 and n != "position_embedding" and not n.startswith(("conv_stem.", "film.")))
        n_proj = sum(p.numel() for p in self.projector.parameters() if p.dim() == 2)
        vit = P * (6 * n_vit + 12 * c.n_layer * c.n_head * c.head_dim * P)
        for k, conv in enumerate(getattr(self.vision, "conv_stem", [])):  # none in --oracle's stand-in tower
            vit += 6 * conv.weight.numel() * (c.image_size >> (k + 1)) ** 2  # at its own output resolution
        return seq_len * self.llm.estimate_flops(seq_len) + n_images * (vit + self.n_visual_tokens * 6 * n_proj)

    @classmethod
    def from_config(cls, cfg):
        """The architecture described by a stage-2 config.json (sections model, vision, tokenizer)."""
        special = cfg["tokenizer"]["special_tokens"]
        return cls(config_from_dict(GPTConfig, cfg["model"]), config_from_dict(VisionConfig, cfg["vision"]),
                   special["<|image|>"], prompt_end_id=special.get("<|assistant|>"),
                   prompt_start_id=special.get("<|user|>"), text_end_id=special.get("<|endoftext|>"),
                   pad_id=special.get("<|pad|>"))


def grow_embeddings(llm, vocab_size):
    """Give llm (a Transformer) vocab_size embedding rows (and lm_head rows when untied), keeping
    the old rows; new rows start at the mean embedding (a neutral token). For special tokens that
    a stage-1 tokenizer lacked."""
    old = llm.embed_tokens.weight
    if vocab_size <= old.size(0):
        return
    with torch.no_grad():
        grown = old.mean(0, keepdim=True).repeat(vocab_size, 1)
        grown[:old.size(0)] = old
        llm.embed_tokens = nn.Embedding(vocab_size, old.size(1), device=old.device, dtype=old.dtype)
        llm.embed_tokens.weight.copy_(grown)
        if llm.config.tie_embeddings:
            llm.lm_head.weight = llm.embed_tokens.weight
        else:
            head = llm.lm_head.weight
            grown_head = head.new_zeros(vocab_size, head.size(1))
            grown_head[:head.size(0)] = head
            llm.lm_head = nn.Linear(head.size(1), vocab_size, bias=False, device=head.device, dtype=head.dtype)
            llm.lm_head.weight.copy_(grown_head)
    llm.config.vocab_size = vocab_size


# ----- Stage 3: action expert, flow matching, vision-language-action policy -----
#
# Token layout (prefix mode, the default; pi0 / SmolVLA style):
#
#   prefix: run once per control step by the VLM (causal, as it was trained)
#   ┌────────────────────────┬──────────────────┬──────────────────┬─────────────┬─────────────┬─────────┐
#   │ <|endoftext|> <|user|> │ scene img tokens │ wrist img tokens │ instruction │<|assistant|>│ pad ... │
#   └────────────────────────┴──────────────────┴──────────────────┴─────────────┴─────────────┴─────────┘
#        keys/values of VLM layer i ───────────────────────────────────────────┐  (pad keys masked)
#   suffix: run by the action expert at each of K denoising steps              ▼
#   ┌─────────────────────┬───────────┬───────────┬─────┬───────────┐  expert layer i attends to
#   │ state x n_frames    │ a_1 (+ t) │ a_2 (+ t) │ ... │ a_H (+ t) │  [prefix K/V of VLM layer i,
#   └─────────────────────┴───────────┴───────────┴─────┴───────────┘   its own suffix K/V]
#   The prefix never sees the suffix; suffix tokens see the prefix (not its padding) and each other.
#   With keypoints (train_vla's default) the state token also carries spatial-softmax keypoints of
#   each image's vision-tower patches, scored against queries read from the instruction
#   (ActionExpert.keypoint_features); like the K/V they are computed once per control step.
#
# action_token mode (the VLA Foundry paper): the prompt ends with a learned <|action|> token; its
# hidden states from the last cond_layers VLM layers, concatenated and projected, form one
# conditioning token, and the expert runs self-attention over [cond, state x n_frames, a_1..a_H].
#
# Flow matching, time convention as in pi0: t = 1 is pure noise, t = 0 the data.
#   x_t = (1 - t) a + t e,  e ~ N(0, I),  target velocity v = dx_t/dt = e - a,  t ~ Beta(1.5, 1)
#   (more weight on noisy t). Sampling: K Euler steps from t = 1 to 0, x <- x - v / K.
#   predict='actions': the expert outputs the clean chunk a_hat and v = (x_t - a_hat) / t, the same
#   flow; its loss |a_hat - a|^2 = t^2 |v_hat - v|^2 is a plain regression (no noise in the target),
#   which learns several times faster here (docs/experiments.md, "what made the policy work").

@dataclass
class ExpertConfig:
    conditioning: str = "prefix"  # 'prefix' (attend to every VLM layer's prefix K/V) | 'action_token'
    n_layer: int = 4              # prefix mode: one expert layer per VLM layer (must be equal)
    n_embd: int = 128             # expert width (smaller than the VLM's)
    mlp_hidden: int = 384
    n_head: int = 4               # prefix mode: n_kv_head and head_dim must equal the VLM's,
    n_kv_head: int = 2            # so an expert query can read the VLM's keys/values directly
    head_dim: int = 64
    state_dim: int = 4            # proprio state size
    action_dim: int = 3
    n_frames: int = 1             # state tokens (one per frame of history)
    n_images: int = 2             # images in the prefix (cameras x frames)
    keypoints: int = 0            # spatial-softmax keypoints per image read off the vision tower's
                                  # patches (before the projector folds them 4 to 1), given to the state
                                  # token; 0 = off. See keypoint_features
    patch_grid: int = 8           # the vision tower's patches per side, and their width
    patch_dim: int = 128
    keypoint_pool: int = 1        # > 1: keypoints aim over the patches averaged in pool x pool blocks, so a finer
                                  # tower can hand them the coarser grid they locked on over (docs/stage2.md)
    answer_points: int = 0        # > 0: the state token also reads where the VLM's answer keypoints (stage 2 aims them at
                                  # the k-th thing a question names) point in each image, at the prompt's <|assistant|>:
                                  # their count. A pointer trained before stage 3 starts, not one it must race to learn
    language_keypoints: bool = False  # keypoints also match each patch against a query read from the
                                      # instruction, so a keypoint can follow "the red block" (keypoint_features)
    vocab_size: int = 0           # language_keypoints: the VLM's embedding rows (one query row per token)
    keypoint_words: bool = False  # language_keypoints: which words a keypoint reads also depends on each word itself
                                  # (a learned weight per token), not on the VLM's hidden states alone (keypoint_features)
    chunk_size: int = 8           # H: actions predicted per chunk (the policy executes the first k)
    predict: str = "velocity"     # what the expert outputs: 'velocity' v = noise - actions (pi0), or 'actions':
                                  # the clean chunk, v = (x_t - actions) / t (the same flow, see VLA.forward)
    vlm_n_embd: int = 256         # width of the VLM hidden states (action_token mode, language_keypoints)
    cond_layers: int = 4          # action_token mode: last N VLM layers concatenated
    suffix_start: int = 128       # RoPE position of the first suffix token, whatever the prefix's
                                  # padding (so padding never shifts the suffix); prefixes must be shorter
    rope_theta: float = 10000.0
    qk_norm: bool = True
    norm_eps: float = 1e-6


class PrefixKV:
    """Duck-types KVCache for one prefix pass: records every layer's keys/values (post RoPE and
    QK-norm) as they are, so gradients flow back into the VLM, unlike KVCache's preallocated
    buffers written in place. k[i], v[i]: (B, n_kv_head, T_prefix, head_dim)."""

    def __init__(self):
        self.k, self.v, self.pos = [], [], 0

    def update(self, layer, k, v):
        self.k.append(k)
        self.v.append(v)
        return k, v


def flow_time_embedding(t, dim, min_period=4e-3, max_period=4.0):
    """Sine-cosine embedding (B,) -> (B, dim) with periods from min_period to max_period (pi0)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=torch.float32)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.float()[:, None] * (2 * math.pi / period)[None]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class ActionExpert(nn.Module):
    """A small transformer predicting, from a noisy action chunk, its flow velocity or its clean
    actions (ExpertConfig.predict; see the layout above). Reads the VLM only through `prefix`:
    {"k", "v": per-layer lists, "mask": (B, T_prefix) bool} in prefix mode, {"cond": (B,
    cond_layers * vlm_n_embd)} in action_token mode, and in both with keypoints "keypoints": their
    features (keypoint_features)."""

    def __init__(self, config: ExpertConfig):
        super().__init__()
        self.config = c = config
        if c.conditioning not in ("prefix", "action_token"):
            raise ValueError(f"conditioning must be 'prefix' or 'action_token', got {c.conditioning!r}")
        if c.predict not in ("velocity", "actions"):
            raise ValueError(f"predict must be 'velocity' or 'actions', got {c.predict!r}")
        self.state_in = nn.Linear(c.state_dim, c.n_embd)
        self.action_in = nn.Linear(c.action_dim, c.n_embd)
        # pi0: MLP over [action embedding, time embedding] per action token
        self.action_time_mlp_in = nn.Linear(2 * c.n_embd, c.n_embd)
        self.action_time_mlp_out = nn.Linear(c.n_embd, c.n_embd)
        if c.conditioning == "action_token":
            self.cond_norm = RMSNorm(c.cond_layers * c.vlm_n_embd, c.norm_eps)
            self.cond_proj = nn.Linear(c.cond_layers * c.vlm_n_embd, c.n_embd)
        self.layers = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.mlp_hidden, c.qk_norm, c.norm_eps)
            for _ in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd, c.norm_eps)
        self.action_out = nn.Linear(c.n_embd, c.action_dim)
        if c.keypoints:
            self.keypoint_logits = nn.Linear(c.patch_dim, c.keypoints)
            self.keypoint_in = nn.Linear(2 * c.keypoints * c.n_images, c.n_embd)
            if c.language_keypoints and c.vocab_size <= 0:
                raise ValueError("language_keypoints needs vocab_size = the VLM's embedding rows, got 0")
            if c.language_keypoints:  # which prompt tokens a keypoint reads, and what each token asks for
                self.keypoint_query_pool = nn.Linear(c.vlm_n_embd, c.keypoints)
                self.keypoint_query_table = nn.Embedding(c.vocab_size, c.patch_dim * c.keypoints)
                if c.keypoint_words:
                    self.keypoint_word_weight = nn.Embedding(c.vocab_size, c.keypoints)
        if c.answer_points:  # per image and answer keypoint: (x, y) and its share of the softmax there
            self.answer_points_in = nn.Linear(3 * c.answer_points * c.n_images, c.n_embd)
        cos, sin = rope_table(c.suffix_start + c.n_frames + c.chunk_size + 1, c.head_dim, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Every tensor's initialisation:
          o_proj                      normal(0, 0.1): the attention output (the only path from the
                                      VLM into the expert) starts loud, or the expert ignores the
                                      prefix for its first ~100 steps
          down_proj                   normal(0, 0.02 / sqrt(2 * n_layer))
          keypoint_query_table        normal(0, 1): every token's query starts distinct and as loud as
                                      the patch scores, instead of inheriting the LLM's alike colour words
          keypoint_word_weight        zeros: at first the hidden states alone choose the words
          other matrices              normal(0, 0.02)
          biases zeros, RMSNorm weights ones"""
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight"):
                nn.init.normal_(p, 0.0, 0.1)
            elif name.endswith("keypoint_query_table.weight"):
                nn.init.normal_(p, 0.0, 1.0)
            elif name.endswith("keypoint_word_weight.weight"):
                nn.init.zeros_(p)
            elif name.endswith("down_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def forward(self, noisy_actions, t, state, prefix):
        """noisy_actions (B, H, A), t (B,), state (B, n_frames, S) -> velocity (B, H, A)."""
        c = self.config
        B, H, _ = noisy_actions.shape
        time_emb = flow_time_embedding(t, c.n_embd).to(noisy_actions.dtype)[:, None].expand(B, H, -1)
        a = self.action_in(noisy_actions)
        a = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([a, time_emb], dim=-1))))
        s = self.state_in(state)
        if c.keypoints:
            s = s + self.keypoint_in(prefix["keypoints"])[:, None]
        if c.answer_points:
            s = s + self.answer_points_in(prefix["answer_points"])[:, None]
        x = torch.cat([s, a], dim=1)  # (B, n_frames + H, n_embd)
        if c.conditioning == "action_token":
            cond = self.cond_proj(self.cond_norm(prefix["cond"]))[:, None]  # (B, 1, n_embd)
            x = torch.cat([cond, x], dim=1)
            rope = (self.rope_cos[:x.size(1)], self.rope_sin[:x.size(1)])
            for block in self.layers:
                x = block(x, rope, causal=False)  # bidirectional, no mask: the SDPA fast path
        else:
            mask = prefix["mask"]  # (B, T_prefix): True = a real prefix token
            T_prefix, S = mask.size(1), x.size(1)
            if T_prefix > c.suffix_start:
                raise ValueError(f"prefix of {T_prefix} tokens > the expert's suffix_start {c.suffix_start}")
            rope = (self.rope_cos[c.suffix_start:c.suffix_start + S], self.rope_sin[c.suffix_start:c.suffix_start + S])
            attn_mask = torch.cat([mask[:, None, None, :].expand(B, 1, S, T_prefix),
                                   mask.new_ones(B, 1, S, S)], dim=-1)  # (B, 1, S, T_prefix + S)
            for i, block in enumerate(self.layers):
                x = block(x, rope, mask=attn_mask, prefix_kv=(prefix["k"][i], prefix["v"][i]))
        return self.action_out(self.norm(x[:, -H:]))

    def keypoint_features(self, patches, tokens=None, hidden=None, text_mask=None):
        """patches (B, n_images * P, patch_dim) -> (B, n_images * keypoints * 2): per image and
        channel k, the (x, y) expected under a softmax over the patches of a learned score (a spatial
        soft-argmax, as in deep spatial autoencoders). A channel that scores "red" returns where the
        red thing is, and its gradient needs no query to find it first: without keypoints the expert
        ignored the scene camera.

        language_keypoints adds patch . q_k to channel k's score (FiLM-like, as CLIPort's language-
        conditioned attention maps): q_k = sum over prompt tokens t of a_tk table[token_t], where
        a_tk = softmax over the prompt's tokens (text_mask) of pool_k(hidden[t]); hidden: the VLM's
        last hidden states (B, T, vlm_n_embd), tokens: their ids. The VLM's states say WHICH words
        matter (the target's colour, not the bowl's), the table says WHAT each word looks for; neither
        needs the VLM to tell colours apart, which its stage-1 embeddings barely do. Queries read off
        the LLM alone did not learn (docs/experiments.md, "what made the policy work")."""
        c = self.config
        B, grid = patches.size(0), c.patch_grid
        if c.keypoint_pool > 1:  # average pool x pool blocks of each image's patch grid
            maps = patches.view(B * c.n_images, grid, grid, c.patch_dim).permute(0, 3, 1, 2)
            grid //= c.keypoint_pool
            patches = F.avg_pool2d(maps, c.keypoint_pool).flatten(2).transpose(1, 2)
        P = grid * grid
        patches = patches.reshape(B, c.n_images, P, c.patch_dim)
        scores = self.keypoint_logits(patches).float()  # (B, n_images, P, keypoints)
        if c.language_keypoints:
            read = self.keypoint_query_pool(hidden).float()
            if c.keypoint_words:
                read = read + 10 * self.keypoint_word_weight(tokens).float()
            read = read.masked_fill(~text_mask[..., None], float("-inf"))
            table = self.keypoint_query_table(tokens).view(B, tokens.size(1), c.patch_dim, c.keypoints).float()
            query = torch.einsum("btk,btck->bck", read.softmax(dim=1), table)
            scores = scores + torch.einsum("bmpc,bck->bmpk", patches.float(), query) / math.sqrt(c.patch_dim)
        weights = scores.softmax(dim=2)
        k = torch.arange(P, device=patches.device)  # raster order: patch k is at column k % g, row k // g
        xy = torch.stack([k % grid, k // grid], -1).float() / max(grid - 1, 1) * 2 - 1
        return torch.einsum("bmpk,pc->bmkc", weights, xy).flatten(1).to(patches.dtype)


class VLA(nn.Module):
    """Vision-language-action policy: a stage-2 VLM (anything with .embed(idx, images) -> (B, T, C)
    and .llm, a Transformer) plus an ActionExpert. Works in normalized state/action space; the
    deployment wrapper (train_vla.VLAPolicy) normalizes inputs and un-normalizes the chunk."""

    def __init__(self, vlm, expert_config: ExpertConfig):
        super().__init__()
        self.vlm = vlm
        self.action_expert = ActionExpert(expert_config)
        llm, c = vlm.llm.config, expert_config
        if c.conditioning == "prefix" and (c.n_layer, c.n_kv_head, c.head_dim) != (llm.n_layer, llm.n_kv_head, llm.head_dim):
            raise ValueError(f"prefix conditioning needs expert n_layer, n_kv_head, head_dim = VLM's "
                             f"{(llm.n_layer, llm.n_kv_head, llm.head_dim)}, got {(c.n_layer, c.n_kv_head, c.head_dim)}")
        if c.keypoints and (c.patch_grid, c.patch_dim) != (vlm.vision_config.grid, vlm.vision_config.n_embd):
            raise ValueError(f"patch_grid, patch_dim = {(c.patch_grid, c.patch_dim)}, the vision tower's are "
                             f"{(vlm.vision_config.grid, vlm.vision_config.n_embd)}")
        if c.keypoints and c.patch_grid % c.keypoint_pool:
            raise ValueError(f"keypoint_pool {c.keypoint_pool} must divide the tower's {c.patch_grid} x "
                             f"{c.patch_grid} patch grid")
        answer = getattr(vlm.vision_config, "answer_keypoints", 0)
        if c.answer_points and c.answer_points != answer:
            raise ValueError(f"answer_points {c.answer_points} must equal the VLM's answer keypoints ({answer})")
        if c.conditioning == "action_token" and (c.vlm_n_embd != llm.n_embd or c.cond_layers > llm.n_layer):
            raise ValueError(f"action_token conditioning needs vlm_n_embd = {llm.n_embd} and cond_layers <= {llm.n_layer}")

    def unused_parameters(self):
        """Parameters the policy does not train; frozen so DDP does not wait for their gradients:
        the LM head and final norm, and in prefix mode the last VLM block after its keys/values.
        Language keypoints read the last hidden states through these as stage 2 left them."""
        llm = self.vlm.llm
        unused = [llm.norm.weight] + ([] if llm.config.tie_embeddings else [llm.lm_head.weight])
        if self.action_expert.config.conditioning == "prefix":  # only k_proj, v_proj, k_norm of the last block are read
            attn = llm.layers[-1].self_attn
            unused += [*attn.q_proj.parameters(), *attn.o_proj.parameters(),
                       *(attn.q_norm.parameters() if attn.q_norm is not None else []),
                       *llm.layers[-1].post_attention_layernorm.parameters(), *llm.layers[-1].mlp.parameters()]
        return unused

    def encode_prefix(self, idx, images, prefix_mask):
        """One VLM pass over the prefix. idx (B, T), images (B, n_images, 3, H, W), prefix_mask
        (B, T) bool (False on padding, which is at the end, so causal attention never reads it)."""
        llm, c = self.vlm.llm, self.action_expert.config
        if images.size(1) != c.n_images:
            raise ValueError(f"{images.size(1)} images per sample, the expert expects n_images = {c.n_images}")
        # (B, T, C) with image embeddings at the <|image|> positions; the tower's patches (B * n_images, P, C_vit)
        inputs = self.vlm.llm_inputs(idx, images)
        x, patches, deepstack = inputs["embeds"], inputs["patches"], inputs["deepstack"]
        kv, hidden = PrefixKV(), []
        rope = llm.rope_at(0, x.size(1), inputs["positions"])
        for i, block in enumerate(llm.layers):
            x = block(x, rope, causal=True, kv_cache=kv, layer=i)
            if i < len(deepstack):  # Qwen3-VL
                x = x + deepstack[i]
            hidden.append(x)
        if c.conditioning == "prefix":
            prefix = {"k": kv.k, "v": kv.v, "mask": prefix_mask}
        else:
            last = prefix_mask.sum(1) - 1  # the <|action|> token ends each prompt
            rows = torch.arange(idx.size(0), device=idx.device)
            prefix = {"cond": torch.cat([h[rows, last] for h in hidden[-c.cond_layers:]], dim=-1)}
        if c.keypoints:  # they read only the prefix: computed once per control step, like its K/V
            patches = patches.reshape(idx.size(0), -1, patches.size(-1))
            text = (idx, llm.norm(x), prefix_mask & (idx != self.vlm.image_token_id)) if c.language_keypoints else ()
            prefix["keypoints"] = self.action_expert.keypoint_features(patches, *text)
        if c.answer_points:
            prefix["answer_points"] = self.answer_points(inputs["keypoints"]["patches"][:, 0])
        return prefix

    def answer_points(self, weights):
        """weights (B, n_images * cells, K): the VLM's answer keypoints' softmax over all the row's images at the
        prompt's <|assistant|> (its first answer position) -> (B, n_images * K * 3): per image and keypoint the
        expected (x, y) under its weights restricted to that image, and their sum there (which camera it found the
        thing in). The answer keypoints' one softmax spans both cameras; stage 3 needs a place in each."""
        places, mass = self.vlm.projector.answer_keypoints.places_per_image(weights.transpose(1, 2))  # (B, K, n_images, .)
        return torch.cat([places, mass[..., None]], -1).transpose(1, 2).flatten(1)  # image, then keypoint, then (x, y, mass)

    def estimate_flops(self, prefix_len, n_images, noise_repeats=1):
        """Training FLOPs per sample: the VLM over the prefix (VLM.estimate_flops, less the LM head,
        which the policy never runs) + noise_repeats x the expert over its S suffix tokens
        (6 N_expert per token + attention to prefix_len + S keys in each layer)."""
        vlm, c = self.vlm, self.action_expert.config
        llm = vlm.llm.config
        S = c.n_frames + c.chunk_size + (c.conditioning == "action_token")
        n_expert = sum(p.numel() for p in self.action_expert.parameters() if p.dim() == 2)
        attend = prefix_len + S if c.conditioning == "prefix" else S
        expert = S * (6 * n_expert + 12 * c.n_layer * c.n_head * c.head_dim * attend)
        return vlm.estimate_flops(prefix_len, n_images) - 6 * prefix_len * llm.vocab_size * llm.n_embd + noise_repeats * expert

    @staticmethod
    def repeat_prefix(prefix, repeats):
        """Each prefix row repeated `repeats` times (several noise draws per VLM pass)."""
        if repeats == 1:
            return prefix
        rep = lambda x: x.repeat_interleave(repeats, dim=0)
        return {k: ([rep(x) for x in v] if isinstance(v, list) else rep(v)) for k, v in prefix.items()}

    def forward(self, idx, images, prefix_mask, state, actions, action_mask, noise, t):
        """Flow-matching loss. state (B, n_frames, S), actions (B, H, A) normalized, action_mask
        (B, H) bool; noise (B*r, H, A) and t (B*r,) drawn by the caller (r noise draws per sample,
        the VLM pass shared by them). Returns the masked mean squared error of the expert's output:
        velocity (noise - actions) or the clean actions, per ExpertConfig.predict."""
        r = noise.size(0) // actions.size(0)
        prefix = self.repeat_prefix(self.encode_prefix(idx, images, prefix_mask), r)
        state, actions, action_mask = (x.repeat_interleave(r, dim=0) for x in (state, actions, action_mask))
        tt = t.to(actions.dtype)[:, None, None]
        x_t = (1 - tt) * actions + tt * noise
        out = self.action_expert(x_t, t, state, prefix)
        # 'actions': the target is the clean chunk, not noise - actions; the velocity (x_t - out) / t
        # is the same flow, but the loss weights each t by t^2 and carries no noise in its target,
        # so early training is a plain regression instead of first learning to echo the noise
        target = actions if self.action_expert.config.predict == "actions" else noise - actions
        err = (out.float() - target.float()).pow(2).mean(-1)  # (B*r, H)
        w = action_mask.float()
        return (err * w).sum() / w.sum().clamp(min=1)

    @torch.no_grad()
    def sample_actions(self, idx, images, prefix_mask, state, noise, flow_steps=10, reuse_prefix=True):
        """K Euler steps from noise (t = 1) to a normalized action chunk (t = 0): (B, H, A).
        reuse_prefix=False recomputes the VLM prefix at every step (the benchmark's baseline)."""
        prefix = self.encode_prefix(idx, images, prefix_mask) if reuse_prefix else None
        x, dt = noise, -1.0 / flow_steps
        for k in range(flow_steps):
            t = torch.full((x.size(0),), 1.0 + k * dt, device=x.device)
            out = self.action_expert(x, t, state, prefix if reuse_prefix else self.encode_prefix(idx, images, prefix_mask))
            v = (x - out) / t[:, None, None] if self.action_expert.config.predict == "actions" else out
            x = x + dt * v
        return x


def sample_flow_time(batch_size, device=None, generator=None):
    """t ~ Beta(1.5, 1) by inverting its CDF t^1.5, squeezed into [0.001, 1] as in pi0."""
    u = torch.rand(batch_size, device=device, generator=generator)
    return u.pow(1 / 1.5) * 0.999 + 0.001


def load_vla(ckpt_dir, map_location="cpu", weights="ema"):
    """A stage-3 policy from a checkpoint directory -> (VLA, config dict). The checkpoint's
    model.safetensors holds the trained weights as policy.* and their EMA as ema.*; weights='ema'
    takes the EMA when the checkpoint has one (what evaluation uses), 'policy' the trained weights."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    parts = {"policy": VLA(VLM.from_config(cfg), config_from_dict(ExpertConfig, cfg["action_expert"]))}
    if cfg.get("policy", {}).get("ema"):
        parts["ema"] = VLA(VLM.from_config(cfg), config_from_dict(ExpertConfig, cfg["action_expert"]))
    holder = nn.ModuleDict(parts)
    load_weights(holder, os.path.join(ckpt_dir, "model.safetensors"))
    return holder["ema" if weights == "ema" and "ema" in parts else "policy"].to(map_location), cfg
