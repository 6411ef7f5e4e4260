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
embed_tokens, norm, lm_head) so pretrained weights map onto these modules one to one.

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
    def __init__(self, n_embd, n_head, n_kv_head, head_dim, qk_norm, eps):
        super().__init__()
        assert n_head % n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.q_proj = nn.Linear(n_embd, n_head * head_dim, bias=False)
        self.k_proj = nn.Linear(n_embd, n_kv_head * head_dim, bias=False)
        self.v_proj = nn.Linear(n_embd, n_kv_head * head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * head_dim, n_embd, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def forward(self, x, rope, mask=None, causal=True, kv_cache=None, layer=0):
        """x: (B, T, C). rope: (cos, sin) for these T positions, or None (no RoPE).

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


class Block(nn.Module):
    """Pre-norm transformer block, shared by the LLM, the ViT and the action expert."""

    def __init__(self, n_embd, n_head, n_kv_head, head_dim, mlp_hidden, qk_norm=True, eps=1e-6):
        super().__init__()
        self.input_layernorm = RMSNorm(n_embd, eps)
        self.self_attn = Attention(n_embd, n_head, n_kv_head, head_dim, qk_norm, eps)
        self.post_attention_layernorm = RMSNorm(n_embd, eps)
        self.mlp = SwiGLU(n_embd, mlp_hidden)

    def forward(self, x, rope, mask=None, causal=True, kv_cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, causal, kv_cache, layer)
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

    def forward(self, idx=None, targets=None, embeds=None, mask=None, kv_cache=None, return_hidden=False):
        """idx: (B, T) token ids, or embeds: (B, T, C) precomputed inputs (stage 2 scatters image
        embeddings into them). targets: (B, T) ids, -1 = no loss. Returns (logits, loss); loss is
        None without targets. With targets only the loss path runs the lm_head over all positions;
        without, the logits of every position are returned (generation slices the last).
        """
        x = self.embed_tokens(idx) if embeds is None else embeds
        start = kv_cache.pos if kv_cache is not None else 0
        rope = self.rope(start, x.size(1))
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask=mask, causal=True, kv_cache=kv_cache, layer=i)
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
                 valid_vocab=None):
        """Sample continuations of idx (B, T) with a KV cache: one prefill pass, then one token per
        step. temperature 0 = greedy. Stops early when every row has produced stop_token.
        valid_vocab: the tokenizer's size; the embedding's padding rows are never sampled."""
        B, T = idx.shape
        cache = self.new_kv_cache(B, min(T + max_new_tokens, self.config.max_seq_len))
        logits, _ = self(idx, kv_cache=cache)
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
            logits, _ = self(next_token, kv_cache=cache)
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

def save_weights(model, path):
    """Write the (uncompiled) model's weights as safetensors. Tied weights are stored once."""
    from safetensors.torch import save_file
    state = model.state_dict()
    seen, tensors = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape)
        if key in seen:  # a tied alias (lm_head.weight = embed_tokens.weight): stored once
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    save_file(tensors, path)


def load_weights(model, path, strict=True):
    """Load safetensors into model; tied aliases missing from the file are fine. Returns the
    names in the file the model does not have (strict=False), e.g. when growing a model."""
    from safetensors.torch import load_file
    tensors = load_file(path)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {n for n in missing if _is_tied_alias(model, n)}
    missing = [n for n in missing if n not in tied]
    if strict and (missing or unexpected):
        raise ValueError(f"weights in {path} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return missing, unexpected


def _is_tied_alias(model, name):
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(name)
    return p is not None and any(q is p and n != name for n, q in params.items())


def save_config(path, **sections):
    """config.json: one JSON object of named sections (model, train, tokenizer, ...)."""
    out = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in sections.items()}
    with open(path, "w") as f:
        json.dump(out, f, indent=2)


def load_llm(ckpt_dir, map_location="cpu"):
    """A stage-1 Transformer from a checkpoint directory (config.json + model.safetensors)."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    model = Transformer(config_from_dict(GPTConfig, cfg["model"]))
    load_weights(model, os.path.join(ckpt_dir, "model.safetensors"))
    return model.to(map_location), cfg
