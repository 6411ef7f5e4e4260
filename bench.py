"""
Training-throughput benchmark of the stage-1 transformer: tokens/s, MFU and peak memory for one
training step (forward, backward, AdamW) on random tokens, warm-up and compilation excluded.

    python bench.py                                        # the default train_llm.py model, CPU
    python bench.py --preset=gpt2 --micro_batch=16        # GPT-2-small-sized, seq 1024 (GPU)

On CUDA it also checks that SDPA runs the FlashAttention kernel (it fails loudly if not).

    python bench.py --bpe_files='/usr/lib/python3*/**/*.py'   # BPE tokenizer training speed instead
    python bench.py --windows=lerobot:DIR --cameras=top,wrist  # stage-3 windows/s, cold and warm cache
    python bench.py --attention                               # model.Attention's kernel against SDPA's, one layer
    python bench.py --vlm=out/vlm --compile=False             # a stage-2 step on the built-in world's rows (eager)
"""
import glob
import resource
import time
from dataclasses import dataclass

import torch

import data as D
from model import GPTConfig, Transformer
from train_llm import autocast_context, make_optimizer, parse_config, peak_flops, resolve_dtype, run


@dataclass
class BenchConfig:
    preset: str = ""            # '' = the fields below; 'gpt2' = 12 layers x 768, 12 heads, seq 1024, vocab 50304
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 64
    mlp_hidden: int = 768
    vocab_size: int = 576
    seq_len: int = 256
    micro_batch: int = 16
    warmup: int = 3             # untimed steps (compilation happens here)
    steps: int = 10             # timed steps
    attention: bool = False     # time one attention call (forward + backward) both ways instead of a training step
    device: str = "auto"
    dtype: str = "auto"         # 'auto' = bf16 on CUDA and CPUs with avx512_bf16/AMX, else fp32 (as train_llm.py)
    compile: bool = True
    weight_decay: float = 0.1   # (optimizer settings, as in train_llm)
    beta1: float = 0.9
    beta2: float = 0.95
    bpe_files: str = ""         # benchmark BPE training instead: a glob of text files, read up to bpe_mb
    bpe_mb: float = 10.0
    bpe_vocab: int = 4096
    windows: str = ""           # benchmark the stage-3 episode reader instead: an episode dir or lerobot:DIR
    cameras: str = "scene,wrist"  # (windows) cameras to read
    image_size: int = 64        # (windows) the model's resolution LeRobot frames are decoded at
    frame_cache: str = "out/bench_frames"  # (windows) emptied first: the cold run decodes into it
    vlm: str = ""               # benchmark a stage-2 training step instead: this checkpoint's VLM on micro_batch world rows


def bench_bpe(cfg):
    texts, size = [], 0
    for path in sorted(glob.glob(cfg.bpe_files, recursive=True)):
        texts.append(open(path, encoding="utf-8", errors="replace").read())
        size += len(texts[-1])
        if size >= cfg.bpe_mb * 1e6:
            break
    if not texts:
        raise D.UserError(f"--bpe_files={cfg.bpe_files} matches no files")
    t0 = time.perf_counter()
    tok = D.Tokenizer.train(texts, cfg.bpe_vocab)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    encode_s = time.perf_counter() - t0
    print(f"BPE: {size / 1e6:.1f} MB of text ({len(texts)} files) -> vocab {tok.n_vocab} in {train_s:.1f}s; "
          f"tiktoken encodes it in {encode_s:.2f}s ({size / n_tokens:.2f} chars/token)")


def bench_windows(cfg, n=2000):
    """EpisodeDataset windows/s: opening the dataset (cold: an empty frame cache, so LeRobot video is
    decoded; warm: the cache exists), then n windows at random (2 frames of history, chunk 8), each
    with its images preprocessed to image_size (our episode format resizes here, per window)."""
    import shutil
    for phase in ("cold", "warm"):
        if phase == "cold":
            shutil.rmtree(cfg.frame_cache, ignore_errors=True)
        t0 = time.perf_counter()
        ds = D.EpisodeDataset(cfg.windows, 2, 8, cfg.cameras.split(","), frame_stride=2, image_size=cfg.image_size,
                              frame_cache=cfg.frame_cache)
        open_s = time.perf_counter() - t0
        order = torch.randint(0, len(ds), (n,), generator=torch.Generator().manual_seed(0)).tolist()
        t0 = time.perf_counter()
        for i in order:  # a window, and its images as the model takes them (what vla_batch does per item)
            [D.preprocess_image(im.numpy(), cfg.image_size) for cam in ds[i]["images"] for im in cam]
        rate = n / (time.perf_counter() - t0)
        print(f"{phase}: opened {cfg.windows} ({len(ds.episodes)} episodes, {len(ds):,} windows) in {open_s:.2f}s, then "
              f"{rate:,.0f} windows/s; a first epoch incl. opening: {len(ds) / (open_s + len(ds) / rate):,.0f} windows/s")


def bench_vlm(cfg, device, dtype):
    """Forward + backward of a stage-2 VLM on the built-in world's rows (train_vlm.py's defaults: captions and
    question conversations), the language-model loss projected at the answer positions only (VLM.forward) and
    at every position (VLM.forward's logits without targets: how stage 2 ran before), alternated so a noisy machine
    slows both alike; then AdamW's step, fused against the per-tensor loop. Medians. With --compile also the
    answer-position loss through torch.compile (train_vlm.py's default on CUDA), and its largest difference from
    eager's loss on the same rows and weights. Stage 2's dense losses (cell facts, keypoint grounding) are not included."""
    import functools
    import itertools
    import statistics
    import torch.nn.functional as F
    import train_vlm
    model, _, tok = train_vlm.load_vlm(cfg.vlm)
    model.to(device)
    c = train_vlm.TrainConfig()
    rows = functools.partial(train_vlm.world_example, split="train", image_size=model.vision_config.image_size,
                             caption_every=c.caption_every, caption_colour_order=c.caption_colour_order,
                             caption_one_list=c.caption_one_list)
    loader = D.ImageTextLoader(rows, batch_size=cfg.micro_batch, num_examples=c.world_train, seed=0, tokenizer=tok,
                               seq_len=model.config.max_seq_len, image_size=model.vision_config.image_size,
                               n_visual_tokens=model.n_visual_tokens, pad_multiple=8)
    batches = [[x.to(device) for x in loader.next_batch()[:3]] for _ in range(cfg.warmup + cfg.steps)]

    losses = {"answer positions": lambda idx, targets, images: model(idx, images, targets)[1],
              "every position": lambda idx, targets, images: F.cross_entropy(
                  model(idx, images)[0].flatten(0, 1).float(), targets.flatten(), ignore_index=-1)}
    if cfg.compile:  # the answer positions' boolean selection is a data-dependent shape: a graph break, not an error
        compiled = torch.compile(model)
        losses["answer positions, compiled"] = lambda idx, targets, images: compiled(idx, images, targets)[1]
    optimizers = {f"AdamW {name}": torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused)
                  for name, fused in (("fused", True), ("per-tensor", False))}
    times = {name: [] for name in [*losses, *optimizers]}
    compiled_error = 0.0
    autocast = autocast_context(device, dtype)
    for r, (idx, targets, images) in enumerate(batches):
        for (name, loss), (opt_name, optimizer) in zip(losses.items(), itertools.cycle(optimizers.items())):
            t0 = time.perf_counter()
            with autocast:
                value = loss(idx, targets, images)
            value.backward()
            t1 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if r >= cfg.warmup:
                times[name].append(t1 - t0)
                times[opt_name].append(time.perf_counter() - t1)
        if cfg.compile:  # the same weights and rows through both (with grad mode on: the training graph, no recompile)
            with autocast:
                difference = model(idx, images, targets)[1] - compiled(idx, images, targets)[1]
            compiled_error = max(compiled_error, difference.abs().item())
    tokens = sum(x[0].numel() for x in batches) / len(batches)
    share = sum((x[1] != -1).sum().item() for x in batches) / sum(x[1].numel() for x in batches)
    print(f"stage 2 ({cfg.vlm}, {dtype}, {torch.get_num_threads()} threads): micro_batch {cfg.micro_batch}, "
          f"{tokens:,.0f} tokens a step, {share:.0%} of them answer tokens; medians of {cfg.steps}")
    print("forward + backward, LM loss at " + ", ".join(f"{name} {statistics.median(times[name]) * 1000:.0f} ms"
                                                      for name in losses))
    print("optimizer step: " + ", ".join(f"{name} {statistics.median(times[name]) * 1000:.1f} ms" for name in optimizers))
    if cfg.compile:
        print(f"compiled loss vs eager's on the same weights and rows: largest difference {compiled_error:.1e} over "
              f"{len(batches)} batches")


PRESETS = {"gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=12, head_dim=64, mlp_hidden=3072,
                        vocab_size=50304, seq_len=1024)}


def bench_attention(cfg, device, dtype):
    """Forward + backward of one causal GQA attention at the model's shape: SDPA against model.explicit_attention
    (what Attention uses on CPU in bf16), alternated so that a noisy machine slows both alike; medians."""
    import statistics
    import torch.nn.functional as F
    from model import explicit_attention
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    B, T, H, K, D = cfg.micro_batch, cfg.seq_len, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q, k, v = (torch.randn(B, h, T, D, device=device, dtype=dt, requires_grad=True) for h in (H, K, K))
    kernels = {"SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != K),
               "explicit": lambda: explicit_attention(q, k, v, is_causal=True)}
    times = {name: [] for name in kernels}
    for r in range(cfg.warmup + cfg.steps):
        for name, kernel in kernels.items():
            t0 = time.perf_counter()
            kernel().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= cfg.warmup:
                times[name].append(time.perf_counter() - t0)
    print(f"attention (B {B}, {H} q / {K} kv heads, T {T}, head_dim {D}, {dtype}, {torch.get_num_threads()} threads), "
          f"forward + backward, median of {cfg.steps}: " +
          ", ".join(f"{name} {statistics.median(t) * 1000:.1f} ms" for name, t in times.items()))


def main():
    cfg = parse_config(BenchConfig)
    if cfg.bpe_files:
        return bench_bpe(cfg)
    if cfg.windows:
        return bench_windows(cfg)
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise D.UserError(f"--preset={cfg.preset}: expected one of {sorted(PRESETS)}")
        for k, v in PRESETS[cfg.preset].items():
            setattr(cfg, k, v)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    dtype = resolve_dtype(device, cfg.dtype)
    if cfg.attention:
        return bench_attention(cfg, device, dtype)
    if cfg.vlm:
        return bench_vlm(cfg, device, dtype)
    model = Transformer(GPTConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                                  n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, head_dim=cfg.head_dim,
                                  mlp_hidden=cfg.mlp_hidden, max_seq_len=cfg.seq_len)).to(device)
    optimizer = make_optimizer({"llm": (model.parameters(), 1e-4)}, cfg, device)
    train_model = torch.compile(model) if cfg.compile else model
    autocast = autocast_context(device, dtype)
    x = torch.randint(0, cfg.vocab_size, (cfg.micro_batch, cfg.seq_len + 1), device=device)

    def step():
        with autocast:
            _, loss = train_model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / cfg.steps
    tokens = cfg.micro_batch * cfg.seq_len
    flops = model.estimate_flops(cfg.seq_len) * tokens
    peak = peak_flops(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name} | dtype {dtype} | compile {cfg.compile} | torch {torch.__version__}")
    print(f"model: {model.num_params():,} params, {cfg.n_layer} layers x {cfg.n_embd}, seq {cfg.seq_len}, "
          f"micro_batch {cfg.micro_batch} ({tokens:,} tokens/step)")
    print(f"warm-up + compile: {warmup_s:.1f}s for {cfg.warmup} steps")
    print(f"step: {dt * 1000:.1f} ms | {tokens / dt:,.0f} tok/s | {flops / dt / 1e12:.2f} TFLOP/s | "
          f"MFU {flops / dt / peak:.1%} of {peak / 1e12:.1f} TFLOP/s "
          f"({'spec-sheet peak' if device.type == 'cuda' and peak > 1e13 else 'measured matmul peak'})")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated")
        # the model's own attention calls, restricted to FlashAttention: raises if any cannot use it
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast:
            model(x[:, :-1], x[:, 1:])[1].backward()
        print(f"flash SDPA kernel: ok for the model's attention (is_causal, {dtype}, head_dim {cfg.head_dim}, "
              f"{cfg.n_head} q / {cfg.n_kv_head} kv heads)")
    else:
        print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (process max RSS)")


if __name__ == "__main__":
    run(main)
