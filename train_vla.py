"""
Stage 3: the vision-language-action policy. The stage-2 VLM grows an action expert (model.py,
flow matching over action chunks), learns from the built-in world's expert demonstrations, and is
scored closed-loop in that world at the end.

    python train_vla.py                                 # from out/vlm; demos collected; ends with the closed-loop eval
    python train_vla.py --init=scratch                  # the same budget from a random VLM of the same shape
    python train_vla.py --conditioning=action_token     # the VLA Foundry paper's conditioning
    python train_vla.py --bench                         # latency of one action chunk (prefix reuse vs not)
    python train_vla.py --init=hf:DIR                   # on a pretrained SmolVLM or Qwen3-VL directory (hf.py)
    python train_vla.py --probe_keypoints               # does a keypoint of out/vla follow the instructed object?
    python train_vla.py --demos=lerobot:DIR --cameras=top,wrist   # a LeRobotDataset v2.1/v3.0 (pip install pyarrow av)
    python train_vla.py --serve=out/vla --port=8000     # the policy over HTTP; eval_sim.py eval --policy http://127.0.0.1:8000
    torchrun --standalone --nproc_per_node=8 train_vla.py --demos=my_robot_dataset
    python train_vla.py --resume                        # continue out_dir's run (--overwrite: start over there)
    torchrun --standalone --nproc_per_node=8 train_vla.py --init=hf:DIR --fsdp   # a policy too big for one GPU

Reads top to bottom: config, demonstrations, model, optimizer, loop (with EMA weights), checkpoint,
closed-loop evaluation. The plumbing (config CLI, DDP, schedule, checkpoints) is train_llm.py's.
"""
import contextlib
import copy
import io
import json
import os
import shutil
import threading
import time
import traceback
import zipfile
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import data as D
import eval_sim
import hf
import model as M
from train_llm import (SHARED_RANGES, SHARED_RULES, MetricsLog, all_reduce_mean, autocast_context, barrier,
                       check_out_dir, due, find_checkpoint, load_checkpoint, lr_multiplier, make_optimizer, parse_config,
                       peak_flops, remove_checkpoints, resolve_dtype, run, save_checkpoint, setup_distributed,
                       stop_if_not_finite, teardown_distributed, validate)


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out/vla"            # checkpoints, metrics.jsonl, eval/ (results.json + GIFs)
    init: str = "out/vlm"               # stage-2 checkpoint to grow from, or 'scratch' (random VLM, same shape),
                                        # or hf:DIR: a Hugging Face SmolVLM/Idefics3/Qwen3-VL directory (hf.py)
    vlm_layers: int = 0                 # with init=hf:DIR: run only the VLM's first N layers (SmolVLA: 16 of 32); 0 = all
    shape_from: str = "out/vlm"         # with init=scratch: the checkpoint whose architecture and tokenizer are copied
    demos: str = ""                     # an episode dataset directory, or lerobot:DIR (a LeRobotDataset v2.1/v3.0,
                                        # --cameras = its observation.images.* keys); '' = the built-in world's expert demos
    frame_cache: str = "out/frames"     # LeRobot video frames decoded once at the model's resolution (uint8 .npy, mmap)
    demos_cache: str = "out/demos"      # where collected demos are kept (one subdirectory per setting)
    episodes_per_task: int = 100        # demos collected per task (seen split) when demos=''
    val_fraction: float = 0.02          # share of episodes held out for the validation loss
    # policy
    conditioning: str = "prefix"        # 'prefix': expert attends to every VLM layer's prefix K/V | 'action_token'
    cameras: str = "scene,wrist"        # cameras the policy sees, comma-separated
    n_frames: int = 1                   # frames of history per camera (and state tokens)
    chunk_size: int = 8                 # H: actions predicted per chunk
    execute_steps: int = 2              # k: actions of each chunk executed open-loop before re-planning
                                        # (k=2 beat k=4 and matched k=1 at half its cost: docs/experiments.md)
    flow_steps: int = 10                # K: Euler steps of the sampler at evaluation
    predict: str = "actions"            # expert output: 'actions' (the clean chunk) | 'velocity' (pi0's); model.py
    expert_n_embd: int = 128            # action expert width (its heads, and in prefix mode its depth, are the VLM's)
    expert_mlp_hidden: int = 384
    cond_layers: int = 4                # action_token: last N VLM layers whose hidden states condition the expert
    keypoints: int = 16                 # spatial-softmax keypoints per image from the vision tower's patches; 0 = off
    language_keypoints: bool = True     # keypoints match patches against queries read from the instruction (model.py)
    keypoint_words: bool = True         # language keypoints also weigh each instruction word by a learned weight of its own
                                        # (model.py): an unseen paraphrase still reads the colour word, whatever the VLM's hidden
                                        # states make of it (docs/stage2.md)
    keypoint_pool: int = 1              # > 1: keypoints aim over the tower's patches averaged in pool x pool blocks (4-pixel
                                        # patches: 2 gives the 8 x 8 grid; no better than answer points, docs/stage2.md)
    answer_points: bool = True          # the state token also reads where the VLM's answer keypoints point in each camera (model.py:
                                        # stage 2 trained them to find the things a question names; from the 4-pixel VLM 89.7 / 91.3%
                                        # against 78.0 / 83.7% without, docs/stage2.md); off where the VLM has none
    state_norm: str = "meanstd"         # normalization of the proprio state: meanstd | minmax | quantile
    action_norm: str = "minmax"         # of the actions (minmax: dataset range -> [-1, 1])
    # optimization
    batch_size: int = 32                # global batch in samples = micro_batch * world_size * grad_accum
    micro_batch: int = 32               # samples per forward pass per process
    noise_repeats: int = 2              # noise draws per sample sharing one VLM pass (cheap extra expert samples)
    max_steps: int = 1300               # ~4 epochs of the demo windows; fewer runs fail to lock on than at 1,000 (docs/experiments.md)
    lr: float = 1e-3                    # peak learning rate of the action expert
    lr_vision: float = 1.0              # learning-rate multipliers per part (x lr); vision at the full rate: the
                                        # keypoints read its patches, and stage 2 leaves them weak
    lr_projector: float = 0.3
    lr_llm: float = 0.3
    freeze_vision: bool = False         # no gradients into the vision tower (it still runs)
    freeze_glimpse: bool = True         # no gradients into the answer keypoints' glimpse CNN (it still runs; none to freeze in
                                        # a VLM without one): a cheaper step, no worse a policy (docs/stage2.md)
    ema_decay: float = 0.99             # EMA of the weights, used for evaluation; 0 = off
    min_lr_frac: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"            # 'cosine' | 'wsd' | 'constant'
    weight_decay: float = 0.01          # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # evaluation and logging
    val_every: int = 100                # steps between validation losses (and at the end; 0 = only there)
    eval_every: int = 0                 # steps between closed-loop evaluations; 0 = only at the end
    eval_episodes: int = 25             # closed-loop episodes per task and split (fixed seeds); 0 = no evaluation
    eval_splits: str = "seen,heldout"
    num_envs: int = 48                  # environments stepped in lockstep (one batched policy call)
    gifs_per_task: int = 1
    save_every: int = 500               # steps between checkpoints (and at the end; 0 = only there)
    keep_checkpoints: int = 2
    # system
    device: str = "auto"
    dtype: str = "auto"                 # 'bfloat16' autocast | 'float32' | 'auto' = bf16 on CUDA and CPUs with avx512_bf16/AMX, else fp32
    compile: bool = False               # torch.compile the training model (CPU: ~no gain at this size)
    seed: int = 1337
    resume: bool = False                # continue exactly from out_dir's latest checkpoint
    overwrite: bool = False             # start over in an out_dir that already holds checkpoints (deletes them)
    fsdp: bool = False                  # under torchrun: shard the policy with FSDP2 (fully_shard per block, then the
                                        # root; bf16 parameters, fp32 gradient reduction on CUDA) instead of DDP replicas.
                                        # Checkpoints are gathered to full weights, the same files as DDP's
    bench: bool = False                 # instead of training: latency of one action chunk, prefix reuse vs recompute
                                        # (with init=hf:DIR also parameters, load memory, one training step)
    bench_repeats: int = 20             # timed repeats of each --bench measurement
    probe_keypoints: bool = False       # instead of training: how well out_dir's keypoints track the instructed object
    serve: str = ""                     # instead of training: serve this checkpoint's policy over HTTP (make_server)
    host: str = "127.0.0.1"             # --serve: address to bind (0.0.0.0 exposes it to the network)
    port: int = 8000


# valid ranges (inclusive) and rules, checked before any work (train_llm.validate)
RANGES = {**SHARED_RANGES, "episodes_per_task": (1, None), "n_frames": (1, None), "chunk_size": (1, None),
          "execute_steps": (1, None), "flow_steps": (1, None), "expert_n_embd": (2, None), "expert_mlp_hidden": (1, None),
          "cond_layers": (1, None), "keypoints": (0, None), "keypoint_pool": (1, None), "batch_size": (1, None),
          "noise_repeats": (1, None),
          "lr_vision": (0, None), "lr_projector": (0, None), "lr_llm": (0, None), "val_every": (0, None),
          "eval_episodes": (0, None), "num_envs": (1, None), "gifs_per_task": (0, None), "vlm_layers": (0, None),
          "bench_repeats": (1, None), "port": (1, 65535)}
RULES = SHARED_RULES + [
    (lambda c, w: c.execute_steps <= c.chunk_size, "--execute_steps={execute_steps} must be between 1 and "
     "--chunk_size={chunk_size}: a policy cannot execute more actions than a chunk holds"),
    (lambda c, w: c.batch_size % (c.micro_batch * w) == 0,
     "--batch_size={batch_size} must be a multiple of micro_batch * world_size = {micro_batch} * {world_size}"),
    (lambda c, w: 0 <= c.ema_decay < 1, "--ema_decay={ema_decay} must be in [0, 1) (0 = off)"),
    (lambda c, w: c.expert_n_embd % 2 == 0, "--expert_n_embd={expert_n_embd} must be even (sine-cosine time embedding)"),
    (lambda c, w: c.conditioning in ("prefix", "action_token"), "--conditioning={conditioning}: expected 'prefix' or 'action_token'"),
    (lambda c, w: c.predict in ("actions", "velocity"), "--predict={predict}: expected 'actions' or 'velocity'"),
    (lambda c, w: {c.state_norm, c.action_norm} <= {"meanstd", "minmax", "quantile"},
     "--state_norm={state_norm}, --action_norm={action_norm}: each must be meanstd, minmax or quantile"),
    (lambda c, w: all(c.cameras.split(",")) and len(set(c.cameras.split(","))) == len(c.cameras.split(",")),
     "--cameras={cameras}: expected distinct names, comma-separated, e.g. scene,wrist"),
    (lambda c, w: set(c.eval_splits.split(",")) <= {"seen", "heldout"},
     "--eval_splits={eval_splits}: expected seen and/or heldout, comma-separated"),
]


def main(argv=None):
    cfg = parse_config(TrainConfig, argv)
    validate(cfg, RANGES, RULES)
    if cfg.bench:
        return bench_latency(cfg)
    if cfg.probe_keypoints:
        return probe_keypoints(cfg)
    if cfg.serve:
        return serve_policy(cfg)
    check_out_dir(cfg)
    dist = setup_distributed(cfg.device)
    if cfg.fsdp and dist.world_size == 1:
        raise D.UserError("--fsdp shards the policy over processes: launch with torchrun --nproc_per_node=2 or more")
    torch.manual_seed(cfg.seed + dist.rank)
    cfg.dtype = resolve_dtype(dist.device, cfg.dtype)
    ckpt = find_checkpoint(cfg.out_dir) if cfg.resume else None
    cameras = tuple(cfg.cameras.split(","))

    # --- the stage-2 VLM (or a random one of its shape, or a pretrained one); its resolution is what
    # LeRobot frames are decoded at
    hf_dir = hf.init_dir(cfg.init)
    if hf_dir and not ckpt:
        vlm, tokenizer = load_hf_vlm(hf_dir, cfg)
    else:
        vlm, _, tokenizer = load_stage2(ckpt or (cfg.shape_from if cfg.init == "scratch" else cfg.init),
                                        random_init=cfg.init == "scratch" and not ckpt,
                                        action_token=cfg.conditioning == "action_token")

    # --- demonstrations: collected once by rank 0 into the cache (or a LeRobot dataset's video decoded
    # once by rank 0 into frame_cache), then read by every rank
    demos = cfg.demos or os.path.join(cfg.demos_cache, f"seen_{cfg.episodes_per_task}ep")
    if not cfg.demos and dist.is_master and not os.path.isfile(os.path.join(demos, "meta.json")):
        collect_demos(demos, cfg.episodes_per_task)
    frame_stride = cfg.execute_steps  # past frames spaced as the policy sees them: one per re-plan
    read_demos = lambda: D.EpisodeDataset(demos, cfg.n_frames, cfg.chunk_size, cameras, frame_stride=frame_stride,
                                          image_size=vlm.vision_config.image_size, frame_cache=cfg.frame_cache)
    episodes = read_demos() if dist.is_master else None
    barrier(dist)
    episodes = episodes if episodes is not None else read_demos()
    meta, n_episodes = episodes.meta, len(episodes.episodes)
    every = max(2, round(1 / cfg.val_fraction)) if cfg.val_fraction > 0 else n_episodes + 1
    val_ids = [e for e in range(n_episodes) if e % every == every - 1]
    train_ids = [e for e in range(n_episodes) if e % every != every - 1]
    dataset = episodes.subset(train_ids)
    val_set = episodes.subset(val_ids) if val_ids else None
    state_norm = D.Normalizer(dataset.stats["state"], cfg.state_norm)
    action_norm = D.Normalizer(dataset.stats["action"], cfg.action_norm)
    normalization = {"state": state_norm.to_dict(), "action": action_norm.to_dict(),
                     "state_names": meta["state_names"], "action_names": meta["action_names"]}
    # the built-in world can score the policy only if it was trained on the world's state, actions and cameras
    in_world = (meta["state_names"] == eval_sim.STATE_NAMES and meta["action_names"] == eval_sim.ACTION_NAMES
                and set(cameras) <= {"scene", "wrist"})

    # --- the action expert, grown on the VLM
    expert_cfg = expert_config(cfg, vlm, cfg.n_frames, len(cameras), len(meta["state_names"]), len(meta["action_names"]))
    if ckpt:
        expert_cfg = M.config_from_dict(M.ExpertConfig, json.load(open(os.path.join(ckpt, "config.json")))["action_expert"])
    vla = M.VLA(vlm, expert_cfg).to(dist.device)
    for p in vla.unused_parameters():
        p.requires_grad_(False)
    if cfg.freeze_vision:
        vla.vlm.vision.requires_grad_(False)
    if cfg.freeze_glimpse:
        glimpse = getattr(getattr(vla.vlm.projector, "answer_keypoints", None), "glimpse", None)
        if glimpse is not None:
            glimpse.requires_grad_(False)
    parts = {"policy": vla}
    if cfg.ema_decay > 0:
        parts["ema"] = copy.deepcopy(vla).requires_grad_(False)
    weights = nn.ModuleDict(parts)  # what a checkpoint holds: policy.* (trained) and ema.* weights
    if cfg.fsdp:  # the full weights go in before sharding; the optimizer's state is re-sharded by load_checkpoint
        if ckpt:
            M.load_weights(weights, os.path.join(ckpt, "model.safetensors"))
        shard_policy(weights, dist.device)
    optimizer = make_optimizer({
        "vision": (vla.vlm.vision.parameters(), cfg.lr * cfg.lr_vision),
        "projector": (vla.vlm.projector.parameters(), cfg.lr * cfg.lr_projector),
        "llm": (vla.vlm.llm.parameters(), cfg.lr * cfg.lr_llm),
        "expert": (vla.action_expert.parameters(), cfg.lr)}, cfg, dist.device)

    grad_accum = cfg.batch_size // (cfg.micro_batch * dist.world_size)  # divisible: validate()
    loader = D.WindowLoader(dataset, cfg.micro_batch, cfg.seed, dist.rank, dist.world_size)
    if ckpt:  # (FSDP: the weights are in already; the optimizer's full state is re-sharded)
        step = load_checkpoint(ckpt, None, ShardedOptimizer(vla, optimizer), loader) if cfg.fsdp else \
            load_checkpoint(ckpt, weights, optimizer, loader)
    else:
        step = 0
    model = torch.compile(vla) if cfg.compile else vla
    if dist.world_size > 1 and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    autocast = autocast_context(dist.device, cfg.dtype)
    n_vis = vlm.n_visual_tokens
    image_size = vlm.vision_config.image_size
    make_batch = lambda items: {k: v.to(dist.device) for k, v in D.vla_batch(
        items, tokenizer, n_vis, image_size, state_norm, action_norm, cfg.conditioning == "action_token").items()}
    policy_settings = {"cameras": list(cameras), "n_frames": cfg.n_frames, "chunk_size": cfg.chunk_size,
                       "execute_steps": cfg.execute_steps, "flow_steps": cfg.flow_steps,
                       "image_size": meta["image_size"][0], "ema": cfg.ema_decay > 0}
    prompt_len = len(D.vla_prompt(tokenizer, dataset.episodes[0]["instruction"], len(cameras) * cfg.n_frames * n_vis,
                                  cfg.conditioning == "action_token"))
    flops_per_step = vla.estimate_flops(prompt_len, len(cameras) * cfg.n_frames, cfg.noise_repeats) * cfg.batch_size
    peak = peak_flops(dist.device, cfg.dtype) * dist.world_size
    if dist.is_master:
        counts = {**vlm.param_counts(), "expert": sum(p.numel() for p in vla.action_expert.parameters())}
        print(f"policy: {', '.join(f'{k} {v:,}' for k, v in counts.items())} params | conditioning {cfg.conditioning} | "
              f"init {cfg.init if not ckpt else ckpt} | trainable {sum(p.numel() for p in vla.parameters() if p.requires_grad):,}")
        print(f"action chunk: chunk_size H = {cfg.chunk_size} predicted, execute_steps k = {cfg.execute_steps} executed, "
              f"flow_steps K = {cfg.flow_steps} | cameras {','.join(cameras)} x {cfg.n_frames} frame(s), "
              f"{n_vis} visual tokens each, prompt ~{prompt_len} tokens")
        print(f"data: {len(dataset):,} windows from {len(train_ids)} episodes ({len(val_ids)} held out for val) in {demos} | "
              f"{dist.world_size} process(es) on {dist.device}, grad_accum {grad_accum}, {cfg.batch_size} samples/step "
              f"x {cfg.noise_repeats} noise draws | {cfg.max_steps} steps")

    def validation():
        """On the held-out episodes, with the evaluated weights (EMA if on) and fixed noise and times,
        so values are comparable across steps: the flow loss, and the mean absolute error of sampled
        chunks' first execute_steps actions (normalized units): does the policy know where to go?"""
        policy_model = weights["ema"] if cfg.ema_decay > 0 else vla
        policy_model.eval()
        g = torch.Generator().manual_seed(cfg.seed)
        losses, errors = [], []
        with torch.no_grad():
            for start in range(0, len(val_set), cfg.micro_batch):
                batch = make_batch([val_set[i] for i in range(start, min(start + cfg.micro_batch, len(val_set)))])
                B, H, A = batch["actions"].shape
                noise = torch.randn(B, H, A, generator=g).to(dist.device)
                t = M.sample_flow_time(B, generator=g).to(dist.device)
                with autocast:
                    losses.append(policy_model(**batch, noise=noise, t=t).float())
                    inputs = {k: batch[k] for k in ("idx", "images", "prefix_mask", "state")}
                    chunk = policy_model.sample_actions(**inputs, noise=noise, flow_steps=cfg.flow_steps).float()
                k = cfg.execute_steps
                mask = batch["action_mask"][:, :k, None].float()
                errors.append(((chunk[:, :k] - batch["actions"][:, :k]).abs() * mask).sum() / (mask.sum() * A))
        policy_model.train()
        return torch.stack(losses).mean().item(), torch.stack(errors).mean().item()

    def closed_loop(tag):
        policy_model = weights["ema"] if cfg.ema_decay > 0 else vla
        policy = VLAPolicy(policy_model.eval(), tokenizer, policy_settings, normalization,
                                    seed=cfg.seed, autocast=autocast)
        out = os.path.join(cfg.out_dir, tag)
        results = run_evaluation(policy, cfg, out, meta["image_size"][0], f"vla step {step}")
        policy_model.train()
        return results

    # --- the loop
    if cfg.overwrite and dist.is_master:
        remove_checkpoints(cfg.out_dir)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), dist.is_master, resume_step=step)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not dist.is_master, dynamic_ncols=True)
    t_start = time.time()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr_scale = lr_multiplier(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        loss_sum = torch.zeros((), device=dist.device)
        for micro_step in range(grad_accum):
            batch = make_batch(loader.next_batch())
            B, H, A = batch["actions"].shape
            noise = torch.randn(B * cfg.noise_repeats, H, A, device=dist.device)
            t = M.sample_flow_time(B * cfg.noise_repeats, device=dist.device)
            if dist.world_size > 1 and cfg.fsdp:  # reduce-scatter gradients only on the last micro-step
                vla.set_requires_gradient_sync(micro_step == grad_accum - 1)
            elif dist.world_size > 1:  # all-reduce gradients only on the last micro-step (set before forward)
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with autocast:
                loss = model(**batch, noise=noise, t=t)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(vla.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        if cfg.fsdp and grad_norm is not None:
            grad_norm = grad_norm.full_tensor()  # FSDP: a replicated DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.ema_decay > 0:  # warm-up of the decay: early EMA follows the fast-moving weights
            update_ema(weights["ema"], vla, min(cfg.ema_decay, (1 + step) / (10 + step)))
        train_loss = all_reduce_mean(loss_sum / grad_accum, dist).item()
        stop_if_not_finite(step + 1, train_loss, grad_norm, bar)
        dt = time.perf_counter() - t0
        step += 1
        record = {"step": step, "loss": round(train_loss, 6), "lr": optimizer.param_groups[0]["lr"],
                  "samples_per_s": round(cfg.batch_size / dt, 2), "mfu": round(flops_per_step / dt / peak, 4)}
        if grad_norm is not None:
            record["grad_norm"] = round(grad_norm.item(), 4)
        # a sharded forward is collective: under FSDP every rank validates (rank 0 logs)
        if val_set is not None and (dist.is_master or cfg.fsdp) and due(step, cfg.val_every, cfg.max_steps):
            record["val_loss"], record["val_action_err"] = (round(x, 6) for x in validation())
        if dist.is_master and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps and cfg.eval_episodes \
                and in_world and not cfg.fsdp:  # under FSDP only the final evaluation runs, on the saved checkpoint
            record["success"] = closed_loop(f"eval_step_{step:06d}")["overall"]["all"]["rate"]
        log.write(record)
        bar.set_postfix(loss=f"{train_loss:.3f}", smp_s=f"{record['samples_per_s']:.1f}",
                        **({"val": f"{record['val_loss']:.3f}", "act_err": f"{record['val_action_err']:.3f}"}
                           if "val_loss" in record else {}))
        bar.update(1)
        if due(step, cfg.save_every, cfg.max_steps):  # every rank: their RNG states are gathered
            state = gathered_state(weights, vla, optimizer) if cfg.fsdp else (weights, optimizer)
            save_checkpoint(cfg.out_dir, step, *state, loader, tokenizer, cfg.keep_checkpoints,
                            model=vlm.llm.config, vision=vlm.vision_config, action_expert=expert_cfg, policy=policy_settings,
                            normalization=normalization, train=cfg, stage="vla")
    bar.close()
    if dist.is_master:
        print(f"trained {step} steps in {time.time() - t_start:.0f}s; checkpoint in {cfg.out_dir}")
        if cfg.eval_episodes and in_world and cfg.fsdp:  # the last checkpoint's full weights (EMA if on), unsharded, on rank 0
            vla = load_policy(cfg.out_dir, device=dist.device).vla
            weights = {"ema": vla, "policy": vla}
        if cfg.eval_episodes and in_world:
            closed_loop("eval")
        elif cfg.eval_episodes:
            print(f"no closed-loop evaluation: the built-in world's state {eval_sim.STATE_NAMES}, actions "
                  f"{eval_sim.ACTION_NAMES} and cameras scene,wrist differ from {demos}'s")
    teardown_distributed(dist)


# --- FSDP2 (--fsdp): the policy's parameters sharded over the ranks

def shard_policy(weights, device):
    """fully_shard each transformer block (vision tower, LLM, action expert), then each root (policy and
    EMA): a block's weights are gathered just before it runs and freed after. Rank 0's weights first go to
    every rank (DDP does that on wrapping; fully_shard keeps each rank's own). On CUDA parameters compute
    in bf16 and gradients are reduced in fp32; on CPU everything stays fp32."""
    import torch.distributed as torch_dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    for t in [*weights.parameters(), *weights.buffers()]:
        torch_dist.broadcast(t.data, 0)
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for vla in weights.values():
        for block in [*vla.vlm.vision.layers, *vla.vlm.llm.layers, *vla.action_expert.layers]:
            fully_shard(block, mp_policy=precision)
        fully_shard(vla, mp_policy=precision)


def full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gathered_state(weights, vla, optimizer):
    """(weights, optimizer) as save_checkpoint reads them: the full weights (tied aliases left out, as
    save_weights leaves them) and the optimizer state in torch's own format (parameters numbered in group
    order), gathered from the shards. Every rank calls it (collective); rank 0 gets the tensors. So an
    FSDP checkpoint holds the same files as a DDP one."""
    from types import SimpleNamespace
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    aliases = {n for n, _ in weights.named_parameters(remove_duplicate=False)} - {n for n, _ in weights.named_parameters()}
    model_state = {k: v for k, v in get_model_state_dict(weights, options=full_state_options()).items() if k not in aliases}
    full = get_optimizer_state_dict(vla, optimizer, options=full_state_options())
    ids = {}
    groups = [{**g, "params": [ids.setdefault(name, len(ids)) for name in g["params"]]} for g in full.get("param_groups", [])]
    optimizer_state = {"state": {ids[name]: s for name, s in full.get("state", {}).items()}, "param_groups": groups}
    return SimpleNamespace(state_dict=lambda: model_state), SimpleNamespace(state_dict=lambda: optimizer_state)


class ShardedOptimizer:
    """load_checkpoint's view of the sharded optimizer: load_state_dict takes torch's full format (what
    gathered_state saved) and re-shards it onto this rank's parameters."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def load_state_dict(self, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        by_param = {p: n for n, p in self.model.named_parameters()}
        order = [by_param[p] for g in self.optimizer.param_groups for p in g["params"]]  # id -> name
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
        full = {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(self.model, self.optimizer, full, options=StateDictOptions(full_state_dict=True))


def collect_demos(path, episodes_per_task):
    """The built-in world's expert demonstrations (seen split), written under a temporary name and
    renamed when complete, so a killed collection is never mistaken for a dataset."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    n = eval_sim.collect(tmp, episodes_per_task, progress=False)
    os.rename(tmp, path)
    D.fsync_dir(os.path.dirname(os.path.abspath(path)))
    print(f"collected {n} expert demonstrations -> {path} ({time.time() - t0:.1f}s)")


def load_stage2(path, random_init=False, action_token=False):
    """(VLM, its config.json dict, tokenizer) from a stage-2 (or stage-3, on resume) checkpoint.
    random_init: the same architecture and tokenizer, fresh weights (the --init=scratch baseline)."""
    if not os.path.exists(path):
        raise D.UserError(f"no stage-2 checkpoint at {path}: train one with `python train_vlm.py` "
                          f"(or pass --init=<checkpoint dir> or --init=scratch)")
    path = find_checkpoint(path)
    cfg = D.read_json(os.path.join(path, "config.json"), "checkpoint config")
    if "vision" not in cfg or "model" not in cfg or "tokenizer" not in cfg:
        raise D.UserError(f"{path} is a stage-'{cfg.get('stage', '?')}' checkpoint without a vision tower: "
                          f"stage 3 needs a stage-2 VLM checkpoint (config.json with model, vision and tokenizer "
                          f"sections); train one with `python train_vlm.py`")
    tokenizer = D.Tokenizer.load(os.path.join(path, "tokenizer.json"))
    for name in ("<|image|>", "<|user|>", "<|assistant|>", "<|pad|>") + (("<|action|>",) if action_token else ()):
        tokenizer.special(name)  # a UserError naming the missing special token
    vlm = M.VLM.from_config(cfg)
    if not random_init and cfg.get("stage") != "vla":
        try:
            M.load_weights(vlm, os.path.join(path, "model.safetensors"))
        except M.UnreadableWeights:
            raise
        except M.WeightsError as e:  # missing/unexpected names, or shapes
            raise D.UserError(f"{path}: weights do not match its config.json: {first_detail(e)}") from None
    return vlm, cfg, tokenizer


def load_hf_vlm(hf_dir, cfg, weights=True):
    """A pretrained SmolVLM/Idefics3/Qwen3-VL directory as the policy's VLM: (VLM, tokenizer with our roles)."""
    if hf.architecture(hf_dir) != "vlm":
        raise D.UserError(f"--init=hf:{hf_dir} is a {hf.architecture(hf_dir)} model; stage 3 needs a vision-language "
                          f"model (SmolVLM/Idefics3/Qwen3-VL), or first `python train_vlm.py --init=hf:{hf_dir}`")
    vlm, tokenizer = hf.load_vlm(hf_dir, cfg.vlm_layers, weights)
    return vlm, hf.add_chat_tokens(vlm.llm, tokenizer, action=cfg.conditioning == "action_token")


def first_detail(error):
    """The informative line of a load_state_dict error (the first size mismatch), for a one-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "size mismatch" in line), lines[-1])[:300]


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over the trained parameters."""
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)


# --- deployment: a trained policy behind eval_sim's act(obs_list) protocol

def load_policy(path, device=None, weights="ema"):
    """A trained VLA checkpoint directory (or a run directory with a 'latest' file) -> VLAPolicy."""
    path = find_checkpoint(path)
    config = D.read_json(os.path.join(path, "config.json"), "checkpoint config")
    if "action_expert" not in config:
        raise D.UserError(f"checkpoint at {path} has no action expert; train one with train_vla.py")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        vla, config = M.load_vla(path, map_location=device, weights=weights)
    except (ValueError, KeyError, RuntimeError) as e:
        raise D.UserError(f"cannot load the policy in {path}: {first_detail(e)}") from None
    return VLAPolicy(vla.eval(), D.Tokenizer.load(os.path.join(path, "tokenizer.json")), config["policy"],
                     config["normalization"])


class VLAPolicy:
    """A stage-3 policy (model.VLA) for evaluate(): per call it checks each observation, tokenizes
    the instruction, preprocesses the camera images, normalizes the state, runs one batched chunk
    prediction for all environments, un-normalizes and clamps the actions to the demonstrations'
    range, and returns the first execute_steps of each chunk: act(obs_list) -> (N, k, 3).

    settings: cameras, n_frames, chunk_size, execute_steps, flow_steps, image_size (config.json's
    "policy" section); normalization: {"state", "action": Normalizer dicts, "state_names", ...}.
    With n_frames > 1 it keeps each environment's past observations (one per call, so one every
    execute_steps steps, as in training); environments are identified through bind()."""
    name = "vla"

    def __init__(self, vla, tokenizer, settings, normalization, seed=0, autocast=None):
        self.vla, self.tokenizer, self.settings = vla, tokenizer, settings
        self.state_norm = D.Normalizer.from_dict(normalization["state"])
        self.action_norm = D.Normalizer.from_dict(normalization["action"])
        self.state_names = normalization.get("state_names", [f"s{i}" for i in range(len(self.state_norm.offset))])
        self.action_names = normalization.get("action_names", [f"a{i}" for i in range(len(self.action_norm.offset))])
        self.device = next(vla.parameters()).device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.autocast = autocast or contextlib.nullcontext()
        self.envs, self.history = None, {}

    def bind(self, envs):
        self.envs = envs

    def _item(self, obs, env):
        """One observation -> {"images": [(n_frames, H, W, 3) per camera], "state": (n_frames, S), "instruction"}."""
        cams, n_frames = self.settings["cameras"], self.settings["n_frames"]
        missing = [c for c in cams if c not in obs.get("images", {})]
        if missing:
            raise D.UserError(f"observation lacks camera(s) {missing}: the policy needs images from {cams}")
        state = np.asarray(obs["state"], np.float32)
        if state.ndim == 2:  # the caller kept the history (the policy server's clients): n_frames of each
            if state.shape != (n_frames, len(self.state_names)):
                raise D.UserError(f"observation state history has shape {state.shape}, the policy expects "
                                  f"({n_frames}, {len(self.state_names)}): n_frames x {self.state_names}")
            return {"images": [np.asarray(obs["images"][c]) for c in cams], "state": state,
                    "instruction": obs["instruction"]}
        if state.shape != (len(self.state_names),):
            raise D.UserError(f"observation state has shape {state.shape}, the policy expects "
                            f"({len(self.state_names)},) = {self.state_names}")
        frame = ([obs["images"][c] for c in cams], state)  # cameras may differ in size: kept apart
        past = eval_sim.recent_frames(self.history, env, frame, n_frames)
        return {"images": [np.stack([p[0][c] for p in past]) for c in range(len(cams))],
                "state": np.stack([p[1] for p in past]),
                "instruction": obs["instruction"]}

    def inputs(self, obs_list):
        """The model's input tensors for a batch of observations."""
        envs = self.envs if self.envs is not None and len(self.envs) == len(obs_list) else [None] * len(obs_list)
        items = [self._item(obs, env) for obs, env in zip(obs_list, envs)]
        vlm = self.vla.vlm
        batch = D.vla_batch(items, self.tokenizer, vlm.n_visual_tokens, vlm.vision_config.image_size, self.state_norm,
                          action_token=self.vla.action_expert.config.conditioning == "action_token")
        return {k: v.to(self.device) for k, v in batch.items()}

    def predict_actions(self, obs_list, noise=None):
        """(N, chunk_size, action_dim) float32 actions, un-normalized and clamped. noise: the sampler's
        starting point (N, H, A) in normalized space; default drawn from the policy's generator."""
        batch = self.inputs(obs_list)
        c = self.vla.action_expert.config
        if noise is None:
            noise = torch.randn(len(obs_list), c.chunk_size, c.action_dim, device=self.device, generator=self.generator)
        with torch.no_grad(), self.autocast:
            chunk = self.vla.sample_actions(**batch, noise=noise.to(self.device), flow_steps=self.settings["flow_steps"])
        lo, hi = self.action_norm.stats["min"], self.action_norm.stats["max"]
        actions = self.action_norm.unnormalize(chunk.float().cpu().numpy())
        return np.clip(actions, lo, hi).astype(np.float32)

    def act(self, obs_list):
        return self.predict_actions(obs_list)[:, :self.settings["execute_steps"]]


def serve_policy(cfg):
    """--serve=DIR: the checkpoint's policy over HTTP at cfg.host:cfg.port until interrupted."""
    policy = load_policy(cfg.serve, device=None if cfg.device == "auto" else cfg.device)
    server = make_server(policy, cfg.host, cfg.port)
    s, url = policy.settings, f"http://{cfg.host}:{server.server_address[1]}"
    print(f"serving {cfg.serve} on {url} (GET /info, POST /act .npz): cameras {','.join(s['cameras'])} x "
          f"{s['n_frames']} frame(s), state {policy.state_names}, chunk {s['chunk_size']} (first {s['execute_steps']} "
          f"to execute) | python eval_sim.py eval --policy {url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def make_server(policy, host="127.0.0.1", port=8000):
    """A ThreadingHTTPServer (not yet serving: call serve_forever) answering with `policy`; one lock
    around the model, so concurrent clients queue for it.
        GET  /info -> JSON: cameras, n_frames, state_names, action_names, chunk_size, execute_steps
        POST /act  <- .npz: images/<camera> (N, n_frames, H, W, 3) uint8 (or (N, H, W, 3): the current frame
                      only, repeated as history), state (N, n_frames, S) float32 (or (N, S)), instruction (N,) str
                   -> .npz: actions (N, execute_steps, A) float32 = act(); chunk (N, chunk_size, A)
    A malformed request gets HTTP 400 and JSON {"error": one line naming the problem}; serving goes on."""
    lock = threading.Lock()
    s = policy.settings
    info = {"cameras": list(s["cameras"]), "n_frames": s["n_frames"], "state_names": list(policy.state_names),
            "action_names": policy.action_names, "chunk_size": s["chunk_size"], "execute_steps": s["execute_steps"]}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
        disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK would stall ~40 ms

        def log_message(self, *args):  # quiet: one line per request would drown the console
            pass

        def reply(self, code, body, kind="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def error(self, code, message):
            self.reply(code, json.dumps({"error": message}).encode())

        def do_GET(self):
            if self.path.rstrip("/") in ("", "/info"):
                return self.reply(200, json.dumps(info).encode())
            self.error(404, f"unknown path {self.path}: GET /info or POST /act")

        def do_POST(self):
            length = self.headers.get("Content-Length", "")
            if not length.isdigit() or int(length) > 1 << 30:
                self.close_connection = True  # the body cannot be skipped: answer, then hang up
                return self.error(411, f"POST /act needs a Content-Length of at most 1 GiB, got {length!r}")
            body = self.rfile.read(int(length))
            if self.path != "/act":
                return self.error(404, f"unknown path {self.path}: GET /info or POST /act")
            try:
                obs_list = observations_from_npz(body, info)
                with lock:
                    chunk = policy.predict_actions(obs_list)
            except D.UserError as e:
                return self.error(400, str(e))
            except Exception as e:  # a bug or an unforeseen input: say so (and print it here), keep serving
                traceback.print_exc()
                return self.error(500, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
            buf = io.BytesIO()
            np.savez(buf, actions=chunk[:, :s["execute_steps"]], chunk=chunk)
            self.reply(200, buf.getvalue(), "application/octet-stream")

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def observations_from_npz(body, info):
    """A request body -> eval_sim-style observations, or a UserError naming what is wrong."""
    expected = "an .npz with images/<camera> for " + ",".join(info["cameras"]) + ", state and instruction"
    try:
        arrays = D.read_npz(body)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise D.UserError(f"request body is not {expected}") from None
    missing = [k for k in [f"images/{c}" for c in info["cameras"]] + ["state", "instruction"] if k not in arrays]
    if missing:
        raise D.UserError(f"observation lacks {', '.join(missing)}: expected {expected}")
    instruction, state = arrays["instruction"], arrays["state"]
    if instruction.dtype.kind != "U" or instruction.ndim != 1:
        raise D.UserError(f"instruction must be a 1-D array of strings (one per observation), got {instruction.dtype} "
                          f"{instruction.shape}")
    n, n_frames, S = len(instruction), info["n_frames"], len(info["state_names"])
    if state.dtype.kind not in "fiu" or state.shape not in ((n, S), (n, n_frames, S)) or not np.isfinite(state).all():
        raise D.UserError(f"state must be finite numbers of shape ({n}, {S}) or ({n}, {n_frames}, {S}) "
                          f"({info['state_names']}), got {state.dtype} {state.shape}")
    for c in info["cameras"]:
        im = arrays[f"images/{c}"]
        frames_ok = im.ndim == 4 or (im.ndim == 5 and im.shape[1] == n_frames and state.ndim == 3)
        if im.dtype != np.uint8 or not frames_ok or len(im) != n or im.shape[-1] != 3 or 0 in im.shape:
            raise D.UserError(f"images/{c} must be uint8 of shape ({n}, H, W, 3) or ({n}, {n_frames}, H, W, 3) "
                              f"with state ({n}, {n_frames}, {S}), got {im.dtype} {im.shape}")
    if state.ndim == 3 and any(arrays[f"images/{c}"].ndim == 4 for c in info["cameras"]):
        raise D.UserError(f"state has a history of {n_frames} frames, so every camera needs one too")
    return [{"images": {c: arrays[f"images/{c}"][i] for c in info["cameras"]}, "state": state[i].astype(np.float32),
             "instruction": str(instruction[i])} for i in range(n)]



def run_evaluation(policy, cfg, out, image_size, name):
    """eval_sim's closed-loop evaluation on the fixed evaluation seeds: results.json, GIFs, a table."""
    splits = tuple(cfg.eval_splits.split(","))
    t0 = time.time()
    records = eval_sim.evaluate(policy, eval_sim.TASKS, cfg.eval_episodes, splits, image_size, cfg.num_envs,
                                os.path.join(out, "gifs"), cfg.gifs_per_task, progress=True)
    per_task, overall = eval_sim.summarize(records)
    result = {"policy": cfg.out_dir, "image_size": image_size, "episodes_per_task": cfg.eval_episodes,
              "splits": list(splits), "seconds": round(time.time() - t0, 2), "tasks": per_task,
              "overall": overall, "episodes": records}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(eval_sim.format_table(per_task, overall, name))
    print(f"closed-loop evaluation: {out}/results.json, GIFs in {out}/gifs ({result['seconds']} s)")
    return result


def expert_config(cfg, vlm, n_frames, n_cameras, state_dim, action_dim):
    """The action expert's shape: train_vla's settings, the VLM's layers, heads and vision grid.
    The suffix's RoPE positions start at 128, or past the images + 96 prompt tokens when those need more."""
    llm, vision = vlm.llm.config, vlm.vision_config
    language_keypoints = cfg.language_keypoints
    table = llm.vocab_size * vision.n_embd * cfg.keypoints
    if language_keypoints and cfg.keypoints and table > 50_000_000:  # a pretrained 49k-152k vocabulary x a wide tower
        print(f"language_keypoints off: their query table would hold {table / 1e6:.0f}M parameters "
              f"(vocab {llm.vocab_size} x patch width {vision.n_embd} x {cfg.keypoints} keypoints)")
        language_keypoints = False
    if cfg.keypoints and vision.grid % cfg.keypoint_pool:
        raise D.UserError(f"--keypoint_pool={cfg.keypoint_pool} must divide the VLM's {vision.grid} x {vision.grid} patch grid")
    answer_points = getattr(vision, "answer_keypoints", 0) if cfg.answer_points else 0
    if cfg.answer_points and not answer_points:
        print("answer_points off: this VLM has no answer keypoints (train_vlm.py --answer_keypoints)")
    n_images = n_cameras * n_frames
    return M.ExpertConfig(
        conditioning=cfg.conditioning, n_layer=llm.n_layer, n_embd=cfg.expert_n_embd, mlp_hidden=cfg.expert_mlp_hidden,
        n_head=llm.n_head, n_kv_head=llm.n_kv_head, head_dim=llm.head_dim, state_dim=state_dim, action_dim=action_dim,
        n_frames=n_frames, n_images=n_images, keypoints=cfg.keypoints, answer_points=answer_points,
        suffix_start=128 if n_images * vlm.n_visual_tokens <= 96 else -(-(n_images * vlm.n_visual_tokens + 96) // 64) * 64,
        language_keypoints=language_keypoints, keypoint_words=language_keypoints and cfg.keypoint_words,
        vocab_size=llm.vocab_size, patch_grid=vlm.vision_config.grid, keypoint_pool=cfg.keypoint_pool,
        patch_dim=vlm.vision_config.n_embd, predict=cfg.predict, chunk_size=cfg.chunk_size, vlm_n_embd=llm.n_embd,
        cond_layers=min(cfg.cond_layers, llm.n_layer), rope_theta=llm.rope_theta, qk_norm=llm.qk_norm)


def bench_latency(cfg):
    """Latency of one action chunk (batch 1, CPU threads as set) for the default policy: the VLM
    prefix computed once and reused by the K Euler steps, vs recomputed at every step. With
    --init=hf:DIR also the parameters, the peak memory (RSS) of loading and one training step."""
    torch.manual_seed(cfg.seed)
    repeats = cfg.bench_repeats
    hf_dir = hf.init_dir(cfg.init)
    loading = {}
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    ckpt = None
    try:
        ckpt = find_checkpoint(cfg.out_dir)
    except D.UserError:
        pass
    if ckpt:  # the trained policy
        policy = load_policy(ckpt, device=device)
    elif hf_dir:  # a pretrained VLM with a new expert: how heavy is it to load and to train?
        rss_before, t0 = peak_rss_mb(), time.perf_counter()
        vlm, tokenizer = load_hf_vlm(hf_dir, cfg)
        loading = {"load_s": time.perf_counter() - t0, "rss_before_mb": rss_before, "load_peak_rss_mb": peak_rss_mb()}
    else:  # a random policy of the default shape: latency does not depend on the weights
        vlm, _, tokenizer = load_stage2(cfg.shape_from if cfg.init == "scratch" else cfg.init, random_init=True)
    if not ckpt:
        vla = M.VLA(vlm, expert_config(cfg, vlm, 1, len(cfg.cameras.split(",")), 4, 3)).to(device).eval()
        for p in vla.unused_parameters():
            p.requires_grad_(False)
        identity = lambda dims, mode: D.Normalizer(D.episode_stats(np.zeros((2, dims))), mode).to_dict()
        policy = VLAPolicy(vla, tokenizer, {"cameras": cfg.cameras.split(","), "n_frames": 1,
                                    "chunk_size": cfg.chunk_size, "execute_steps": cfg.execute_steps,
                                    "flow_steps": cfg.flow_steps, "image_size": 64},
                                    {"state": identity(4, "meanstd"), "action": identity(3, "minmax")})
    env = eval_sim.TabletopEnv("pick_place", policy.settings["image_size"])
    obs, _ = env.reset(eval_sim.EVAL_SEED)
    batch = policy.inputs([obs])
    vla = policy.vla
    noise = torch.randn(1, vla.action_expert.config.chunk_size, vla.action_expert.config.action_dim, device=device)

    def once(reuse):
        t0 = time.perf_counter()
        out = vla.sample_actions(**batch, noise=noise, flow_steps=cfg.flow_steps, reuse_prefix=reuse)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    # the two ways alternate, so a burst of load on a shared machine hits both: ratio = median of pairs
    for _ in range(3):  # warm-up
        once(True), once(False)
    pairs = [(once(True), once(False)) for _ in range(repeats)]
    (a_reuse, _), (a_full, _) = pairs[-1]
    t_reuse, t_full = (float(np.median([p[k][1] for p in pairs])) for k in (0, 1))
    ratio = float(np.median([full[1] / reuse[1] for reuse, full in pairs]))
    t_act = float(np.median([(lambda t0: (policy.act([obs]), time.perf_counter() - t0)[1])(time.perf_counter())
                             for _ in range(repeats)]))
    diff = (a_reuse - a_full).abs().max().item()
    served = {n: bench_server(policy, n, image_size=policy.settings["image_size"], repeats=repeats) for n in (1, 32)}
    print(f"device: {device} x{torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"{'checkpoint ' + ckpt if ckpt else cfg.init if hf_dir else 'random weights, default shape'}")
    result = {}
    if hf_dir and not ckpt:
        counts = {**vla.vlm.param_counts(), "expert": sum(p.numel() for p in vla.action_expert.parameters())}
        # AdamW in fp32 holds ~16 bytes per trainable parameter (weights, gradients, two moments)
        need = 16 * sum(p.numel() for p in vla.parameters() if p.requires_grad)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if device.type == "cpu" else float("inf")
        train_s = bench_train_step(vla, batch, cfg, device) if need < 0.8 * ram else []
        result = {**loading, "params": counts, "train_step_s": train_s}
        print(f"parameters: {', '.join(f'{k} {v:,}' for k, v in counts.items())} (total {sum(counts.values()):,})")
        print(f"loading {hf_dir}: {loading['load_s']:.1f} s, peak RSS {loading['load_peak_rss_mb']:,.0f} MB "
              f"(process before loading: {loading['rss_before_mb']:,.0f} MB)")
        if train_s:
            print(f"one training step (micro_batch {cfg.micro_batch}, {cfg.noise_repeats} noise draws, AdamW), median of "
                  f"{len(train_s)}: {float(np.median(train_s)):.2f} s  (each: {', '.join(f'{t:.2f}' for t in train_s)})")
        else:
            print(f"training step skipped: AdamW needs ~{need / 2**30:.0f} GiB, this machine has {ram / 2**30:.0f} GiB")
    print(f"one action chunk (batch 1, H = {vla.action_expert.config.chunk_size}, K = {cfg.flow_steps} Euler steps), median of {repeats}:")
    print(f"  prefix computed once, reused: {t_reuse * 1000:8.1f} ms")
    print(f"  prefix recomputed every step: {t_full * 1000:8.1f} ms   ({ratio:.1f}x slower, median of paired runs)")
    print(f"  policy.act incl. preprocessing: {t_act * 1000:6.1f} ms")
    print(f"  max |reuse - recompute| = {diff:.2e}")
    for n, (local, remote, transport) in served.items():
        print(f"  policy server on loopback, batch {n:2d}: {remote * 1000:6.1f} ms vs {local * 1000:6.1f} ms in process; "
              f"the transport alone (.npz over HTTP, {len(policy.settings['cameras'])} x {policy.settings['image_size']} px "
              f"images each) {transport * 1000:.1f} ms")
    return {**result, "reuse_ms": t_reuse * 1000, "recompute_ms": t_full * 1000, "ratio": ratio,
            "max_abs_diff": diff, "served_ms": {n: [x * 1000 for x in v] for n, v in served.items()}}


def peak_rss_mb():
    """This process's peak resident memory so far (Linux reports ru_maxrss in KB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_train_step(vla, batch, cfg, device):
    """Seconds of each of bench_repeats training steps (forward, backward, AdamW) on micro_batch
    copies of one observation with random target actions, after one warm-up step."""
    B, r, c = cfg.micro_batch, cfg.noise_repeats, vla.action_expert.config
    inputs = {k: v.expand(B, *v.shape[1:]).contiguous() for k, v in batch.items()}
    actions = torch.randn(B, c.chunk_size, c.action_dim, device=device)
    action_mask = torch.ones(B, c.chunk_size, dtype=torch.bool, device=device)
    optimizer = make_optimizer({"policy": (vla.parameters(), cfg.lr)}, cfg, device)
    vla.train()
    times = []
    for _ in range(cfg.bench_repeats + 1):
        t0 = time.perf_counter()
        noise = torch.randn(B * r, c.chunk_size, c.action_dim, device=device)
        loss = vla(**inputs, actions=actions, action_mask=action_mask, noise=noise,
                   t=M.sample_flow_time(B * r, device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    vla.eval()
    return times[1:]


def bench_server(policy, n, image_size, repeats=20):
    """Median seconds per act() on n observations: in process, through make_server on a free loopback
    port (eval_sim.HTTPPolicy; the two alternate, so load on a shared machine hits both), and the
    transport alone (.npz and HTTP: the same server with a policy that answers zeros at once)."""

    class Zeros:  # the served policy's interface, without the model
        settings, state_names, action_names = policy.settings, policy.state_names, policy.action_names
        def predict_actions(self, obs_list):
            return np.zeros((len(obs_list), policy.settings["chunk_size"], len(policy.action_names)), np.float32)

    obs = [eval_sim.TabletopEnv(eval_sim.TASKS[i % len(eval_sim.TASKS)], image_size).reset(eval_sim.EVAL_SEED + i)[0]
           for i in range(n)]

    def timed(act):
        t0 = time.perf_counter()
        act(obs)
        return time.perf_counter() - t0

    servers = [make_server(p, "127.0.0.1", 0) for p in (policy, Zeros())]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    remote, transport = (eval_sim.HTTPPolicy(f"http://127.0.0.1:{s.server_address[1]}") for s in servers)
    try:
        timed(policy.act), timed(remote.act), timed(transport.act)  # warm-up
        runs = [(timed(policy.act), timed(remote.act), timed(transport.act)) for _ in range(repeats)]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    return tuple(float(np.median([r[k] for r in runs])) for k in (0, 1, 2))


def probe_keypoints(cfg, scenes_per_task=40):
    """Does some keypoint follow the object the instruction names? For each keypoint channel of
    out_dir's policy on the first camera, the R^2 of a linear fit from its (x, y) to the target
    object's table position, over the first frames of the evaluation scenes (seen split). The
    policies that succeed are those where one channel locks on (docs/experiments.md, "seeds").
    The same scenes again with each task's held-out paraphrase as the instruction: does the channel
    still follow when the words change (reach failed on "bring the gripper above the ...": docs/stage2.md)?
    With answer_points, the same R^2 for each of the VLM's answer keypoints the expert reads.
    Returns (R^2 per channel with the seen instructions, with the paraphrases)."""
    policy = load_policy(find_checkpoint(cfg.out_dir), device="cpu")
    c = policy.vla.action_expert.config
    if not c.keypoints and not c.answer_points:
        raise D.UserError(f"the policy in {cfg.out_dir} has no keypoints (trained with --keypoints=0)")
    points, paraphrased, answer_points, targets = [], [], [], []
    for task in eval_sim.TASKS:
        for i in range(scenes_per_task):
            env = eval_sim.TabletopEnv(task, policy.settings["image_size"])
            obs, _ = env.reset(eval_sim.EVAL_SEED + i)
            target = env.scene.objs[env.scene.goal["target"]]
            paraphrase = eval_sim.instruction_text(env.scene, len(eval_sim.TEMPLATES[task]) - 1)
            with torch.no_grad():  # the scene with its instruction and with the paraphrase, one batch
                batch = policy.inputs([obs, dict(obs, instruction=paraphrase)])
                prefix = policy.vla.encode_prefix(batch["idx"], batch["images"], batch["prefix_mask"])
            if c.keypoints:
                first_camera = prefix["keypoints"].view(2, c.n_images, c.keypoints, 2)[:, 0].numpy()
                points.append(first_camera[0])
                paraphrased.append(first_camera[1])
            if c.answer_points:  # (x, y, share) per image and answer keypoint: the first camera's places
                answer_points.append(prefix["answer_points"].view(2, c.n_images, c.answer_points, 3)[0, 0, :, :2].numpy())
            targets.append((target.x, target.y))
    camera = policy.settings["cameras"][0]
    if c.answer_points:
        r2 = keypoint_r2(np.array(answer_points), np.array(targets))
        print(f"{cfg.out_dir}: R^2 of the instructed object's position from each of the VLM's answer keypoints in the "
              f"{camera} camera ({len(targets)} scenes): " + ", ".join(f"#{k} {v:.2f}" for k, v in enumerate(r2)))
    if not c.keypoints:
        return None, None
    r2, r2_paraphrased = (keypoint_r2(np.array(p), np.array(targets)) for p in (points, paraphrased))
    best = np.argsort(r2)[::-1][:4]
    print(f"{cfg.out_dir}: R^2 of the instructed object's position from each {camera}-camera "
          f"keypoint ({len(targets)} scenes), best first: " + ", ".join(f"#{k} {r2[k]:.2f}" for k in best)
          + "; the same channels with the held-out paraphrases: " + ", ".join(f"#{k} {r2_paraphrased[k]:.2f}" for k in best))
    return r2, r2_paraphrased


def keypoint_r2(points, targets):
    """points (N, K, 2), targets (N, 2) -> (K,): per channel, the share of the targets' variance
    explained by a least-squares affine map from that channel's (x, y)."""
    r2 = []
    for k in range(points.shape[1]):
        X = np.c_[points[:, k], np.ones(len(points))]
        residual = X @ np.linalg.lstsq(X, targets, rcond=None)[0] - targets
        r2.append(1 - (residual ** 2).sum() / ((targets - targets.mean(0)) ** 2).sum())
    return np.array(r2)


if __name__ == "__main__":
    run(main)
