"""
Stage 3: the vision-language-action policy. The stage-2 VLM grows an action expert (model.py,
flow matching over action chunks), learns from the built-in world's expert demonstrations, and is
scored closed-loop in that world at the end.

    python train_vla.py                                 # from out/vlm; demos collected; 2-core CPU 6.8-9.3 min with eval
    python train_vla.py --init=scratch                  # the same budget from a random VLM of the same shape
    python train_vla.py --conditioning=action_token     # the VLA Foundry paper's conditioning
    python train_vla.py --bench                         # latency of one action chunk (prefix reuse vs not)
    python train_vla.py --init=hf:DIR                   # on a pretrained SmolVLM/Idefics3 directory (hf.py)
    python train_vla.py --probe_keypoints               # does a keypoint of out/vla follow the instructed object?
    torchrun --standalone --nproc_per_node=8 train_vla.py --demos=my_robot_dataset
    torchrun --standalone --nproc_per_node=8 train_vla.py --init=hf:DIR --fsdp   # a policy too big for one GPU

Reads top to bottom: config, demonstrations, model, optimizer, loop (with EMA weights), checkpoint,
closed-loop evaluation. The plumbing (config CLI, DDP, schedule, checkpoints) is train_llm.py's.
"""
import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import data as D
import eval_sim
import hf
import model as M
from train_llm import (all_reduce_mean, autocast_context, barrier, due, find_checkpoint, load_checkpoint,
                       lr_multiplier, make_optimizer, parse_config, peak_flops, resolve_dtype, run,
                       save_checkpoint, setup_distributed, teardown_distributed, MetricsLog)


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out/vla"            # checkpoints, metrics.jsonl, eval/ (results.json + GIFs)
    init: str = "out/vlm"               # stage-2 checkpoint to grow from, or 'scratch' (random VLM, same shape),
                                        # or hf:DIR: a Hugging Face SmolVLM/Idefics3 directory (hf.py)
    vlm_layers: int = 0                 # with init=hf:DIR: run only the VLM's first N layers (SmolVLA: 16 of 32); 0 = all
    shape_from: str = "out/vlm"         # with init=scratch: the checkpoint whose architecture and tokenizer are copied
    demos: str = ""                     # an episode dataset directory; '' = collect the built-in world's expert demos
    demos_cache: str = "out/demos"      # where collected demos are kept (one subdirectory per setting)
    episodes_per_task: int = 100        # demos collected per task (seen split) when demos=''
    val_fraction: float = 0.02          # share of episodes held out for the validation loss
    # policy
    conditioning: str = "prefix"        # 'prefix': expert attends to every VLM layer's prefix K/V | 'action_token'
    cameras: str = "scene,wrist"        # cameras the policy sees, comma-separated
    n_frames: int = 1                   # frames of history per camera (and state tokens)
    chunk_size: int = 8                 # H: actions predicted per chunk
    execute_steps: int = 2              # k: actions of each chunk executed open-loop before re-planning (same
                                        # checkpoint: k=4 54%, k=2 67%, k=1 67% at twice k=2's evaluation time)
    flow_steps: int = 10                # K: Euler steps of the sampler at evaluation
    predict: str = "actions"            # expert output: 'actions' (the clean chunk) | 'velocity' (pi0's); model.py
    expert_n_embd: int = 128            # action expert width (its heads, and in prefix mode its depth, are the VLM's)
    expert_mlp_hidden: int = 384
    cond_layers: int = 4                # action_token: last N VLM layers whose hidden states condition the expert
    keypoints: int = 16                 # spatial-softmax keypoints per image from the vision tower's patches; 0 = off
    language_keypoints: bool = True     # keypoints match patches against queries read from the instruction (model.py)
    state_norm: str = "meanstd"         # normalization of the proprio state: meanstd | minmax | quantile
    action_norm: str = "minmax"         # of the actions (minmax: dataset range -> [-1, 1])
    # optimization
    batch_size: int = 32                # global batch in samples = micro_batch * world_size * grad_accum
    micro_batch: int = 32               # samples per forward pass per process
    noise_repeats: int = 2              # noise draws per sample sharing one VLM pass (cheap extra expert samples)
    max_steps: int = 1300               # ~4 epochs of the demo windows; runs reaching 60%: 12 of 17 at 1,000 steps, 4 of 5 here (README)
    lr: float = 1e-3                    # peak learning rate of the action expert
    lr_vision: float = 1.0              # learning-rate multipliers per part (x lr); vision at the full rate: the
                                        # keypoints read its patches, and stage 2 leaves them weak
    lr_projector: float = 0.3
    lr_llm: float = 0.3
    freeze_vision: bool = False         # no gradients into the vision tower (it still runs)
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
    dtype: str = "auto"                 # 'auto' = bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False               # torch.compile the training model (CPU: ~no gain at this size)
    seed: int = 1337
    resume: bool = False
    fsdp: bool = False                  # under torchrun: shard the policy with FSDP2 (fully_shard per block, then the
                                        # root; bf16 parameters, fp32 gradient reduction on CUDA) instead of DDP replicas.
                                        # Checkpoints are gathered to full weights, the same files as DDP's
    bench: bool = False                 # instead of training: latency of one action chunk, prefix reuse vs recompute
                                        # (with init=hf:DIR also parameters, load memory, one training step)
    bench_repeats: int = 20             # timed repeats of each --bench measurement
    probe_keypoints: bool = False       # instead of training: how well out_dir's keypoints track the instructed object


def main(argv=None):
    cfg = parse_config(TrainConfig, argv)
    check_config(cfg)
    if cfg.bench:
        return bench_latency(cfg)
    if cfg.probe_keypoints:
        return probe_keypoints(cfg)
    dist = setup_distributed(cfg.device)
    if cfg.fsdp and dist.world_size == 1:
        raise D.UserError("--fsdp shards the policy over processes: launch with torchrun --nproc_per_node=2 or more")
    torch.manual_seed(cfg.seed + dist.rank)
    cfg.dtype = resolve_dtype(dist.device, cfg.dtype)
    ckpt = find_checkpoint(cfg.out_dir) if cfg.resume else None
    cameras = tuple(cfg.cameras.split(","))

    # --- demonstrations: collected once by rank 0 into the cache, then read by every rank
    demos = cfg.demos or os.path.join(cfg.demos_cache, f"seen_{cfg.episodes_per_task}ep")
    if not cfg.demos and dist.is_master and not os.path.isfile(os.path.join(demos, "meta.json")):
        collect_demos(demos, cfg.episodes_per_task)
    barrier(dist)
    meta = D._read_json(os.path.join(demos, "meta.json"), "dataset metadata file")
    n_episodes = meta.get("num_episodes", 0)
    every = max(2, round(1 / cfg.val_fraction)) if cfg.val_fraction > 0 else n_episodes + 1
    val_ids = [e for e in range(n_episodes) if e % every == every - 1]
    train_ids = [e for e in range(n_episodes) if e % every != every - 1]
    frame_stride = cfg.execute_steps  # past frames spaced as the policy sees them: one per re-plan
    dataset = D.EpisodeDataset(demos, cfg.n_frames, cfg.chunk_size, cameras, train_ids, frame_stride)
    val_set = D.EpisodeDataset(demos, cfg.n_frames, cfg.chunk_size, cameras, val_ids, frame_stride) if val_ids else None
    state_norm = D.Normalizer(dataset.stats["state"], cfg.state_norm)
    action_norm = D.Normalizer(dataset.stats["action"], cfg.action_norm)
    normalization = {"state": state_norm.to_dict(), "action": action_norm.to_dict(),
                     "state_names": meta["state_names"], "action_names": meta["action_names"]}

    # --- model: the stage-2 VLM (or a random one of its shape, or a pretrained one) + a new action expert
    hf_dir = hf.init_dir(cfg.init)
    if hf_dir and not ckpt:
        vlm, tokenizer = load_hf_vlm(hf_dir, cfg)
    else:
        vlm, _, tokenizer = load_stage2(ckpt or (cfg.shape_from if cfg.init == "scratch" else cfg.init),
                                        random_init=cfg.init == "scratch" and not ckpt,
                                        action_token=cfg.conditioning == "action_token")
    expert_cfg = expert_config(cfg, vlm, cfg.n_frames, len(cameras), len(meta["state_names"]), len(meta["action_names"]))
    if ckpt:
        expert_cfg = M.config_from_dict(M.ExpertConfig, json.load(open(os.path.join(ckpt, "config.json")))["action_expert"])
    vla = M.VLA(vlm, expert_cfg).to(dist.device)
    for p in vla.unused_parameters():
        p.requires_grad_(False)
    if cfg.freeze_vision:
        vla.vlm.vision.requires_grad_(False)
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

    if cfg.batch_size % (cfg.micro_batch * dist.world_size):
        raise D.UserError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch * world_size = "
                          f"{cfg.micro_batch * dist.world_size}")
    grad_accum = cfg.batch_size // (cfg.micro_batch * dist.world_size)
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
        policy = eval_sim.VLAPolicy(policy_model.eval(), tokenizer, policy_settings, normalization,
                                    seed=cfg.seed, autocast=autocast)
        out = os.path.join(cfg.out_dir, tag)
        results = run_evaluation(policy, cfg, out, meta["image_size"][0], f"vla step {step}")
        policy_model.train()
        return results

    # --- the loop
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
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.ema_decay > 0:  # warm-up of the decay: early EMA follows the fast-moving weights
            update_ema(weights["ema"], vla, min(cfg.ema_decay, (1 + step) / (10 + step)))
        train_loss = all_reduce_mean(loss_sum / grad_accum, dist).item()
        dt = time.perf_counter() - t0
        step += 1
        record = {"step": step, "loss": round(train_loss, 6), "lr": optimizer.param_groups[0]["lr"],
                  "samples_per_s": round(cfg.batch_size / dt, 2), "mfu": round(flops_per_step / dt / peak, 4)}
        if grad_norm is not None:  # (FSDP: a replicated DTensor)
            record["grad_norm"] = round((grad_norm.full_tensor() if cfg.fsdp else grad_norm).item(), 4)
        # a sharded forward is collective: under FSDP every rank validates (rank 0 logs)
        if val_set is not None and (dist.is_master or cfg.fsdp) and due(step, cfg.val_every, cfg.max_steps):
            record["val_loss"], record["val_action_err"] = (round(x, 6) for x in validation())
        if dist.is_master and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps and cfg.eval_episodes \
                and not cfg.fsdp:  # under FSDP only the final evaluation runs, on the saved checkpoint
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
        if cfg.eval_episodes and cfg.fsdp:  # the last checkpoint's full weights (EMA if on), unsharded, on rank 0
            vla = eval_sim.load_policy(cfg.out_dir, device=dist.device).vla
            weights = {"ema": vla, "policy": vla}
        if cfg.eval_episodes:
            closed_loop("eval")
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


def check_config(cfg):
    if cfg.conditioning not in ("prefix", "action_token"):
        raise D.UserError(f"--conditioning={cfg.conditioning}: expected 'prefix' or 'action_token'")
    if not 1 <= cfg.execute_steps <= cfg.chunk_size:
        raise D.UserError(f"--execute_steps={cfg.execute_steps} must be between 1 and --chunk_size={cfg.chunk_size}")
    if cfg.noise_repeats < 1 or cfg.flow_steps < 1 or cfg.n_frames < 1:
        raise D.UserError("--noise_repeats, --flow_steps and --n_frames must be at least 1")
    cams = cfg.cameras.split(",")
    if not all(cams) or len(set(cams)) != len(cams):
        raise D.UserError(f"--cameras={cfg.cameras}: expected distinct names, comma-separated, e.g. scene,wrist")
    for s in cfg.eval_splits.split(","):
        if s not in ("seen", "heldout"):
            raise D.UserError(f"--eval_splits={cfg.eval_splits}: expected seen and/or heldout, comma-separated")


def collect_demos(path, episodes_per_task):
    """The built-in world's expert demonstrations (seen split), written under a temporary name and
    renamed when complete, so a killed collection is never mistaken for a dataset."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    n = eval_sim.collect(tmp, episodes_per_task, progress=False)
    os.rename(tmp, path)
    print(f"collected {n} expert demonstrations -> {path} ({time.time() - t0:.1f}s)")


def load_stage2(path, random_init=False, action_token=False):
    """(VLM, its config.json dict, tokenizer) from a stage-2 (or stage-3, on resume) checkpoint.
    random_init: the same architecture and tokenizer, fresh weights (the --init=scratch baseline)."""
    if not os.path.exists(path):
        raise D.UserError(f"no stage-2 checkpoint at {path}: train one with `python train_vlm.py` "
                          f"(or pass --init=<checkpoint dir> or --init=scratch)")
    path = find_checkpoint(path)
    cfg = D._read_json(os.path.join(path, "config.json"), "checkpoint config")
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
        except (ValueError, RuntimeError) as e:  # missing/unexpected names, or shapes
            raise D.UserError(f"{path}: weights do not match its config.json: {first_detail(e)}") from None
    return vlm, cfg, tokenizer


def load_hf_vlm(hf_dir, cfg, weights=True):
    """A pretrained SmolVLM/Idefics3 directory as the policy's VLM: (VLM, tokenizer with our roles)."""
    if hf.architecture(hf_dir) != "vlm":
        raise D.UserError(f"--init=hf:{hf_dir} is a {hf.architecture(hf_dir)} model; stage 3 needs a vision-language "
                          f"model (SmolVLM/Idefics3), or first `python train_vlm.py --init=hf:{hf_dir}`")
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
    n_images = n_cameras * n_frames
    return M.ExpertConfig(
        conditioning=cfg.conditioning, n_layer=llm.n_layer, n_embd=cfg.expert_n_embd, mlp_hidden=cfg.expert_mlp_hidden,
        n_head=llm.n_head, n_kv_head=llm.n_kv_head, head_dim=llm.head_dim, state_dim=state_dim, action_dim=action_dim,
        n_frames=n_frames, n_images=n_images, keypoints=cfg.keypoints,
        suffix_start=128 if n_images * vlm.n_visual_tokens <= 96 else -(-(n_images * vlm.n_visual_tokens + 96) // 64) * 64,
        language_keypoints=language_keypoints, vocab_size=llm.vocab_size, patch_grid=vlm.vision_config.grid,
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
        policy = eval_sim.load_policy(ckpt, device=device)
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
        policy = eval_sim.VLAPolicy(vla, tokenizer, {"cameras": cfg.cameras.split(","), "n_frames": 1,
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
    return {**result, "reuse_ms": t_reuse * 1000, "recompute_ms": t_full * 1000, "ratio": ratio, "max_abs_diff": diff}


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


def probe_keypoints(cfg, scenes_per_task=40):
    """Does some keypoint follow the object the instruction names? For each keypoint channel of
    out_dir's policy on the first camera, the R^2 of a linear fit from its (x, y) to the target
    object's table position, over the first frames of the evaluation scenes (seen split). The
    policies that succeed are those where one channel locks on (README: 0.92-0.95 against 0.23)."""
    policy = eval_sim.load_policy(find_checkpoint(cfg.out_dir), device="cpu")
    c = policy.vla.action_expert.config
    if not c.keypoints:
        raise D.UserError(f"the policy in {cfg.out_dir} has no keypoints (trained with --keypoints=0)")
    points, targets = [], []
    for task in eval_sim.TASKS:
        for i in range(scenes_per_task):
            env = eval_sim.TabletopEnv(task, policy.settings["image_size"])
            obs, _ = env.reset(eval_sim.EVAL_SEED + i)
            target = env.scene.objs[env.scene.goal["target"]]
            with torch.no_grad():
                batch = policy.inputs([obs])
                keypoints = policy.vla.encode_prefix(batch["idx"], batch["images"], batch["prefix_mask"])["keypoints"]
            points.append(keypoints.view(c.n_images, c.keypoints, 2)[0].numpy())
            targets.append((target.x, target.y))
    r2 = keypoint_r2(np.array(points), np.array(targets))
    best = np.argsort(r2)[::-1]
    print(f"{cfg.out_dir}: R^2 of the instructed object's position from each {policy.settings['cameras'][0]}-camera "
          f"keypoint ({len(targets)} scenes), best first: " + ", ".join(f"#{k} {r2[k]:.2f}" for k in best[:4]))
    return r2


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
