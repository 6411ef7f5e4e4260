"""
Stage 2: the stage-1 language model grows eyes and becomes a vision-language model.

    python train_llm.py && python train_vlm.py           # built-in world scenes
    python train_vlm.py --blank_images                    # the control: same run, every image zeroed
    python train_vlm.py --data=pairs.jsonl,shards/*.tar   # your image-text data (see data.py)
    torchrun --standalone --nproc_per_node=8 train_vlm.py --micro_batch=2   # the global batch of 16 over 8 processes
    python train_vlm.py --resume                          # continue out_dir's run (--overwrite: start over there)
    python train_vlm.py --score=out/vlm --world_val=512   # a trained VLM on more held-out scenes, with its mistakes

Loads a stage-1 checkpoint (weights and tokenizer), adds a ViT and a pixel-shuffle projector
(model.py: VLM) and trains on chat sequences whose <|image|> placeholders carry the image, with
the loss on answer tokens only (data.py: encode_chat). Validation: loss, exact-match accuracy of
greedy answers to questions about held-out scenes (per question type, beside the most-common-answer
baseline), and a few captions. The loop and its plumbing are stage 1's (train_llm.py).
"""
import functools
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

import data as D
import hf
import model as M
from eval_sim import QUESTION_TYPES, SCENE_LABEL_NAMES, question_type
from train_llm import (SHARED_RANGES, SHARED_RULES, MetricsLog, all_reduce_mean, autocast_context, barrier, check_out_dir,
                       due, find_checkpoint, load_checkpoint, lr_multiplier, make_optimizer, parse_config, peak_flops,
                       remove_checkpoints, resolve_dtype, round_up, run, save_checkpoint, setup_distributed,
                       stop_if_not_finite, teardown_distributed, validate)


@dataclass
class TrainConfig:
    # I/O
    init: str = "out/llm"               # stage-1 checkpoint: a run directory (its 'latest') or a step_* directory;
                                        # or hf:DIR: a Hugging Face VLM (SmolVLM/Idefics3/Qwen3-VL: fine-tuned whole, the vision
                                        # flags and image_size are its own) or LLM (Qwen3/Llama: a new tower around it)
    out_dir: str = "out/vlm"            # checkpoints (step_XXXXXX/ + 'latest'), metrics.jsonl
    data: str = "world"                 # 'world' = scenes rendered by eval_sim.py, else .jsonl/.tar paths or globs, comma-separated
    world_train: int = 100000           # training scenes for data=world, rendered on demand (~0.5 ms each)
    world_val: int = 64                 # held-out scenes for data=world (about 10 questions each)
    val_fraction: float = 0.02          # held-out share of user data
    skip_bad: bool = False              # skip and count unreadable images instead of stopping with an error
    augment: bool = False               # light brightness/contrast jitter (no flips: answers say left and right)
    blank_images: bool = False          # the text-only control: every image zeroed, in training and validation
    world_turns: int = 0                # questions per training conversation for data=world; 0 = all of the scene's (~10)
    world_question_sets: int = 1        # data=world: question sets drawn per training scene (each about a random object;
                                        # repeats dropped): more questions that name an object per rendered image
    caption_every: int = 4              # data=world: every caption_every-th scene is a caption (with world_turns > 0:
                                        # every caption_every-th micro-batch), the others questions
    caption_colour_order: bool = True   # data=world: captions name objects in a fixed colour order (the next to name is the
                                        # next colour present), not the scene's random one, which left objects out and
                                        # repeated others (docs/stage2.md)
    caption_one_list: bool = True       # data=world, with caption_colour_order: objects and bowls in one list by colour (the
                                        # closing relation between its first two), not objects then bowls, which named
                                        # bowls' colours as blocks and discs (captions P/R on 512 scenes 85/81, 83/78 ->
                                        # 88-91/87-88% in three runs, precision +0.8 from the relation: docs/stage2.md)
    balance_in_bowl: bool = False       # data=world, training scenes: where an object lies in a bowl, "is the X in the Y bowl?"
                                        # asks about it half the time ("yes" is otherwise rare; held-out scenes unchanged)
    hold_more: bool = False             # data=world, training scenes: half of those where nothing is held roll on until the
                                        # gripper holds something (where the task picks up; held-out scenes unchanged)
    # model: the new parts (the LLM's shape comes from --init)
    image_size: int = 64
    patch_size: int = 4                 # 4-pixel patches (16 x 16): a held object shows as a 2-pixel strip between the fingers,
                                        # which 8-pixel patches lost among its neighbours (holding 84-90 -> 94-98%, docs/stage2.md)
    vision_layers: int = 1              # one tower block over the 256 patches: two read no better and cost ~6% a step
    vision_embd: int = 128
    vision_heads: int = 4
    vision_head_dim: int = 32
    vision_mlp_hidden: int = 384
    pixel_shuffle: int = 4              # visual tokens per image = (image_size / patch_size / pixel_shuffle)^2: 16
    projector_hidden: int = 512
    vision_stem: str = "conv"           # 'conv' (three 3x3 convolutions of stride 2, model.py: each patch sees past its edges;
                                        # stage 3 from it 92.2 against 89.7% over five seeds) | 'patch' (one stride-patch
                                        # convolution, as SigLIP; docs/stage2.md)
    coord_channels: bool = False        # the tower also sees each pixel's x and y (CoordConv)
    film: bool = False                  # the prompt's words scale and shift the stem's channels (FiLM, model.py)
    cell_words: float = 0.0             # data=world: weight of a dense extra loss: the LLM's output at each visual token
                                        # names the colour in its cell (read off the rendered pixels) or 'nothing'; 0 = off
    answer_keypoints: int = 4           # keypoints over the patches aimed by each question's words, read at its answer
                                        # (model.AnswerKeypoints; off when their word table would pass 50M parameters); 0 = off
    answer_pairs: bool = True           # the answer keypoints also hand over each pair's |dx|, |dy|, distance, signs (model.py):
                                        # 79.9% against 70.9% over three probe seeds (docs/stage2.md)
    # The next six together read shape, the gripper and captions that keypoint pairs alone did not (docs/stage2.md)
    answer_glimpse: int = 16            # > 0: the answer keypoints also read a square of this many pixels around where they point
                                        # through a small CNN (model.py): shape, the gripper's fingers are finer than a patch; 0 = off
    answer_glimpse_grey: bool = True    # the glimpse sees brightness only: shape and the fingers need no colour, and stage 3
                                        # learned worse from a glimpse that saw the target colours (docs/stage2.md)
    answer_glimpse_dense: bool = True   # the glimpse's CNN runs once over the image, max-pooled per patch (model.py): no crops,
                                        # so cheap enough with --answer_every_token
    answer_every_token: bool = True     # the answer keypoints are also read at every answer token, aimed by the turn's words so
                                        # far (model.py): a caption's "red" aims them at the red object, to name its shape
    answer_summary: int = 32            # > 0: the answer keypoints' read-out also holds this many max-pooled features of the
                                        # patches: which colours and kinds the image holds (for captions); 0 = off
    answer_near: bool = True            # keypoints 1.. also prefer patches near keypoint 0, as strongly as the question's words
                                        # ask (model.py): "the object nearest the gripper"
    answer_offsets: bool = True         # each patch also says where within itself its thing lies, so keypoint places (and pairs'
                                        # distances) are finer than the patch grid; with ground_keypoints, trained to the named
                                        # things' true places (left/above 91 -> 98% on 512 scenes: docs/stage2.md)
    answer_fine: bool = False           # the answer keypoints aim over a grid twice as fine as the patches: each patch's features
                                        # plus the conv stem's map there (model.py). Off: with 8-pixel patches it read the held
                                        # object better but 'in the bowl' worse; 4-pixel patches read both (docs/stage2.md)
    cell_facts: float = 1.0             # data=world: weight of a dense extra loss: a linear read-out of each visual token predicts
                                        # what its cell of the table holds (cell_facts: colours, kinds, object facts, gripper)
    ground_keypoints: float = 1.0       # data=world: weight of a dense extra loss: at each answer, keypoint k (k < 2) lands on the
                                        # patch of the k-th thing its question names (an object by colour, or the gripper);
                                        # off, with one printed line, where the model has no answer keypoints
    ground_every_token: bool = True     # with ground_keypoints and answer_every_token: also at each answer token that names a
                                        # thing (a caption's "red"), keypoint 0 lands on that thing's patch (captions P/R
                                        # 68/70 -> 83/78% with answer_offsets: docs/stage2.md)
    patch_facts: float = 0.0            # data=world, --probe: weight of cell_facts' loss also on the tower's patches (a linear
                                        # read-out of each patch, not saved: an experiment)
    distinct_words: bool = True         # data=world from our stage 1: re-draw the colour and shape words' embeddings (after
                                        # stage 1 they are nearly alike: the text never needed to tell them apart)
    seq_len: int = 0                    # max tokens per sample (longer conversations lose turns); 0 = the LLM's max_seq_len
    # optimization
    batch_size: int = 16                # global batch in samples = micro_batch * world_size * grad_accum; stage 2 is
    micro_batch: int = 16               # update-limited: 1,200 x 16 beat 600 x 32 at the same FLOPs (docs/stage2.md)
    max_steps: int = 1200               # a quick --probe: --max_steps=400
    lr: float = 1e-3                    # the LLM's peak learning rate (pretrained: gentler than the new parts)
    vision_lr: float = 1e-3             # 3e-3 was too high for the tower alone (docs/stage2.md)
    projector_lr: float = 3e-3
    freeze_llm: bool = False            # train only the vision tower and projector
    projector_warmup_steps: int = 0     # the first steps train only the projector (vision and LLM at LR 0)
    min_lr_frac: float = 0.1            # final LR as a fraction of the peak
    warmup_steps: int = 20
    schedule: str = "cosine"            # 'cosine' | 'wsd' | 'constant' (see train_llm.lr_multiplier)
    weight_decay: float = 0.1           # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0              # max global grad norm; 0 = off
    # evaluation and logging
    eval_every: int = 200               # steps between validations (loss + question accuracy) and at the end (0 = only there)
    eval_batches: int = 4               # validation-loss micro-batches per process
    show_captions: int = 3              # captions of held-out images printed at the end
    save_every: int = 200               # steps between checkpoints (and at the end; 0 = only there)
    keep_checkpoints: int = 2
    # system
    device: str = "auto"                # 'auto' | 'cpu' | 'cuda'
    dtype: str = "auto"                 # 'bfloat16' autocast | 'float32' | 'auto' = bf16 on CUDA and CPUs with avx512_bf16/AMX, else fp32
    compile: bool = torch.cuda.is_available()  # torch.compile the training model (on CPU: slower to start, no faster)
    seed: int = 1337
    resume: bool = False                # continue exactly from out_dir's latest checkpoint
    overwrite: bool = False             # start over in an out_dir that already holds checkpoints (deletes them)
    # the fast probe: train once per seed (no checkpoints), then a table of held-out accuracy per question type with
    # and without the images, and caption precision/recall; judge a recipe by more than one seed in minutes
    probe: bool = False
    score: str = ""                     # a stage-2 checkpoint: answer and caption --world_val held-out scenes of the built-in
                                        # world (64 leave 34-96 questions per type) and list its commonest mistakes; no training
    probe_seeds: str = "1,2"            # comma-separated training seeds, run one after the other
    oracle: str = ""                    # data=world: perfect eyes instead of the tower: 'scene' = every visual token is one learned
                                        # linear map of the scene's true facts; 'cells' = the visual token of each grid cell maps
                                        # the facts of the objects (and gripper) whose centre is in it, plus a learned position
                                        # (eval_sim.scene_labels): what the LLM can learn to read when perception is solved


# valid ranges (inclusive) and rules, checked before any work (train_llm.validate)
RANGES = {**SHARED_RANGES, "world_train": (1, None), "world_val": (1, None), "image_size": (1, None),
          "patch_size": (1, None), "vision_layers": (1, None), "vision_embd": (1, None), "vision_heads": (1, None),
          "vision_head_dim": (1, None), "vision_mlp_hidden": (1, None), "pixel_shuffle": (1, None),
          "projector_hidden": (1, None), "seq_len": (0, None), "batch_size": (1, None), "vision_lr": (0, None),
          "projector_lr": (0, None), "projector_warmup_steps": (0, None), "eval_batches": (1, None),
          "show_captions": (0, None), "world_turns": (0, None), "caption_every": (1, None), "world_question_sets": (1, None),
          "cell_words": (0, None), "cell_facts": (0, None), "answer_keypoints": (0, None),
          "answer_glimpse": (0, None), "answer_summary": (0, None),
          "ground_keypoints": (0, None), "patch_facts": (0, None)}
RULES = SHARED_RULES + [
    (lambda c, w: c.image_size % c.patch_size == 0 and (c.image_size // c.patch_size) % c.pixel_shuffle == 0,
     "--image_size={image_size} must be a multiple of patch_size {patch_size}, and the patch grid a multiple of "
     "--pixel_shuffle={pixel_shuffle}"),
    (lambda c, w: c.batch_size % (c.micro_batch * w) == 0,
     "--batch_size={batch_size} must be a multiple of micro_batch * world_size = {micro_batch} * {world_size}"),
    (lambda c, w: c.vision_stem in ("patch", "conv"), "--vision_stem={vision_stem}: expected 'patch' or 'conv'"),
    (lambda c, w: c.vision_stem != "conv" or c.patch_size & (c.patch_size - 1) == 0,
     "--vision_stem=conv halves the resolution per convolution: --patch_size={patch_size} must be a power of 2 "
     "(or use --vision_stem=patch)"),
    (lambda c, w: c.oracle in ("", "scene", "cells"), "--oracle={oracle}: expected '', 'scene' or 'cells'"),
    (lambda c, w: not c.patch_facts or (c.data == "world" and c.probe and not c.oracle),
     "--patch_facts is an experiment of the probe on the built-in world: it needs --data=world, --probe, no --oracle"),
    (lambda c, w: not c.score or c.data == "world", "--score measures on the built-in world's scenes: it needs --data=world"),
    (lambda c, w: not c.oracle or (c.data == "world" and c.probe),
     "--oracle reads the built-in world's scene facts and saves nothing: it needs --data=world and --probe"),
]


def main(argv=None):
    cfg = parse_config(TrainConfig, argv)
    validate(cfg, RANGES, RULES)
    if cfg.score:
        return score(cfg)
    if not cfg.probe:  # the probe writes no checkpoints
        check_out_dir(cfg)
    hf_dir = hf.init_dir(cfg.init)
    if hf_dir and hf.architecture(hf_dir) == "vlm":
        cfg.image_size = hf.image_size(hf_dir)  # the data is rendered at the pretrained tower's resolution
    return probe(cfg) if cfg.probe else train(cfg)


def train(cfg):
    """One stage-2 run; returns the trained model and what its validation measured."""
    dist = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed + dist.rank)
    cfg.dtype = resolve_dtype(dist.device, cfg.dtype)
    resume_ckpt = find_checkpoint(cfg.out_dir) if cfg.resume else None

    # --- data: examples (rendered on demand for the built-in world), a held-out set
    if cfg.data == "world":
        # short conversations (world_turns > 0): whole micro-batches of captions (a caption is ~4x a question's
        # length and rows pad to the longest), so the scenes are read in order (each index is a fresh random scene)
        train_examples, n_train = functools.partial(world_example, split="train", image_size=cfg.image_size,
                                                    turns=cfg.world_turns,
                                                    caption_block=cfg.micro_batch if cfg.world_turns else 1,
                                                    caption_every=cfg.caption_every,
                                                    question_sets=cfg.world_question_sets,
                                                    caption_colour_order=cfg.caption_colour_order,
                                                    balance_in_bowl=cfg.balance_in_bowl,
                                                    hold_more=cfg.hold_more,
                                                    caption_one_list=cfg.caption_one_list), cfg.world_train
        val_examples = [world_example(i, "val", cfg.image_size, caption_colour_order=cfg.caption_colour_order,
                                      caption_one_list=cfg.caption_one_list) for i in range(cfg.world_val)]
    else:
        examples = D.read_image_text(D.expand_paths(cfg.data))
        n_val = max(1, int(len(examples) * cfg.val_fraction))
        if len(examples) <= n_val:
            raise D.UserError(f"{cfg.data} holds {len(examples)} example(s): too few to hold out {n_val} for validation")
        train_examples, val_examples, n_train = examples[:-n_val], examples[-n_val:], len(examples) - n_val

    # --- model: the stage-1 LLM + a new vision tower and projector (on resume: the saved VLM)
    if resume_ckpt:
        raw_model, _, tokenizer = load_vlm(resume_ckpt)
    elif hf.init_dir(cfg.init) and hf.architecture(hf.init_dir(cfg.init)) == "vlm":
        raw_model, tokenizer = hf.load_vlm(hf.init_dir(cfg.init))
        tokenizer = hf.add_chat_tokens(raw_model.llm, tokenizer)
    else:
        raw_model, tokenizer = vlm_from_llm(cfg, pixel_stats(train_examples, n_train, cfg))
    raw_model.to(dist.device)
    seq_len = cfg.seq_len or raw_model.config.max_seq_len
    if seq_len > raw_model.config.max_seq_len:
        raise D.UserError(f"--seq_len={seq_len} exceeds the LLM's max_seq_len {raw_model.config.max_seq_len}")
    loader_args = dict(tokenizer=tokenizer, seq_len=seq_len, image_size=cfg.image_size, rank=dist.rank,
                       world_size=dist.world_size, n_visual_tokens=raw_model.n_visual_tokens, skip_bad=cfg.skip_bad,
                       pad_multiple=32 if cfg.compile else 8)  # padding to 32 costs ~5% of the tokens; it spares recompiles
    train_loader = D.ImageTextLoader(train_examples, batch_size=cfg.micro_batch, num_examples=n_train, seed=cfg.seed,
                                     augment=cfg.augment, shuffle=not (cfg.data == "world" and cfg.world_turns), **loader_args)
    val_loader = D.ImageTextLoader(val_examples, batch_size=max(1, min(cfg.micro_batch, len(val_examples) // dist.world_size)),
                                   shuffle=False, **loader_args)
    grad_accum = cfg.batch_size // (cfg.micro_batch * dist.world_size)  # divisible: validate()

    # --- optimizer: a learning rate per part; a frozen LLM gets no gradients at all
    parts = {"vision": (raw_model.vision.parameters(), cfg.vision_lr),
             "projector": (raw_model.projector.parameters(), cfg.projector_lr)}
    if cfg.freeze_llm:
        raw_model.llm.requires_grad_(False)
    else:
        parts["llm"] = (raw_model.llm.parameters(), cfg.lr)
    patch_reader = None
    if cfg.patch_facts:  # an experiment: probe runs save nothing, so the read-out lives here (outside --grad_clip)
        patch_reader = torch.nn.Linear(raw_model.vision_config.n_embd, CELL_FEATURES).to(dist.device)
        parts["patch_reader"] = (patch_reader.parameters(), cfg.projector_lr)
    optimizer = make_optimizer(parts, cfg, dist.device)
    step = load_checkpoint(resume_ckpt, raw_model, optimizer, train_loader) if resume_ckpt else 0
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    autocast = autocast_context(dist.device, cfg.dtype)
    peak = peak_flops(dist.device, cfg.dtype) * dist.world_size
    if dist.is_master:
        counts = raw_model.param_counts()
        print(f"model: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f" params; {raw_model.n_visual_tokens} "
              f"visual tokens per image | {dist.world_size} process(es) on {dist.device}, grad_accum {grad_accum}, "
              f"{cfg.batch_size} samples/step | peak {peak / 1e12:.2f} TFLOP/s" + (" | CONTROL: images blanked" if cfg.blank_images else ""))

    cell_targets = None
    if cfg.cell_words and cfg.data == "world":
        cell_targets = functools.partial(cell_colour_targets, grid=round(raw_model.n_visual_tokens ** 0.5),
                                         words=[tokenizer.encode(" " + w)[0] for w in world_colours()[0] + ["nothing"]],
                                         rgb=world_colours()[1])

    ground = None  # like cell_facts: on by default, off (one printed line) where the world's labels cannot reach
    if cfg.ground_keypoints and cfg.data == "world":
        has_keypoints = raw_model.vision_config.answer_keypoints
        word_index = ground_word_index(tokenizer, raw_model.config.vocab_size, dist.is_master) if has_keypoints else None
        if word_index is not None:
            ground = functools.partial(grounding_loss, word_index=word_index.to(dist.device),
                                       grid=raw_model.vision_config.answer_grid, every_token=cfg.ground_every_token,
                                       places=raw_model.vision_config.answer_offsets,
                                       fine=raw_model.vision_config.answer_fine)
        elif dist.is_master:
            print("ground_keypoints off: " + ("the tokenizer splits every colour word and 'gripper' in pieces" if has_keypoints
                                              else "this model has no answer keypoints (--oracle, --answer_keypoints=0, "
                                                   "or a vocabulary too large)"))

    def to_device(batch):  # -> idx, targets, images (--oracle: the scene facts), the cells' colour words (or None)
        idx, targets, images = (t.to(dist.device, non_blocking=True) for t in batch[:3])
        cells = cell_targets(images) if cell_targets else None  # from the real pixels, also in the blanked control
        images = batch[3].to(dist.device) if cfg.oracle else images
        return idx, targets, images.zero_() if cfg.blank_images else images, cells

    def evaluate():  # eager (raw_model): a compiled no-grad graph of the answer keypoints crashed inductor's CPU code
        raw_model.eval()
        val_loader.load_state_dict({"epoch": 0, "pos": 0, "bad": []})  # the same batches every time
        losses = []
        with torch.no_grad():
            for _ in range(cfg.eval_batches):
                idx, targets, images, *_ = to_device(val_loader.next_batch())
                with autocast:
                    losses.append(raw_model(idx, images, targets)[1].float())
        raw_model.train()
        return all_reduce_mean(torch.stack(losses).mean(), dist).item()

    questions = val_questions(val_examples, cfg.image_size, cfg.oracle)
    answer = functools.partial(answer_questions, raw_model, tokenizer, autocast=autocast, blank=cfg.blank_images)

    # --- the loop
    if cfg.overwrite and dist.is_master:
        remove_checkpoints(cfg.out_dir)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), dist.is_master and not cfg.probe, resume_step=step)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not dist.is_master, dynamic_ncols=True)
    t_start, record, accuracy, curve = time.perf_counter(), {}, None, []
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr_scale = lr_multiplier(step, cfg)
        for group in optimizer.param_groups:
            only_projector = step < cfg.projector_warmup_steps and group["name"] != "projector"
            group["lr"] = 0.0 if only_projector else group["base_lr"] * lr_scale
        loss_sum, flops = torch.zeros((), device=dist.device), 0
        for micro_step in range(grad_accum):
            batch = train_loader.next_batch()
            idx, targets, images, cells = to_device(batch)
            facts = (cell_facts(batch[3].flatten(0, 1).float(), round(raw_model.n_visual_tokens ** 0.5)).to(dist.device)
                     if raw_model.vision_config.fact_outputs else None)
            if dist.world_size > 1:  # all-reduce gradients only on the last micro-step (set before forward)
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with autocast:
                _, loss, extras = model(idx, images, targets, return_extras=True)
                if facts is not None:  # (B * n_images, cells, CELL_FEATURES), the visual tokens' order
                    predicted = raw_model.projector.facts(extras["visual"].view(*facts.shape[:2], -1))
                    loss = loss + cfg.cell_facts * cell_facts_loss(predicted.float(), facts)
                if patch_reader is not None:
                    patch_targets = cell_facts(batch[3].flatten(0, 1).float(), raw_model.vision_config.grid).to(dist.device)
                    loss = loss + cfg.patch_facts * cell_facts_loss(patch_reader(extras["patches"]).float(), patch_targets)
                if ground is not None and extras["keypoints"] is not None:
                    loss = loss + cfg.ground_keypoints * ground(extras["keypoints"], idx, batch[3][:, 0].to(dist.device))
                if cells is not None:  # the visual tokens' positions, in the order their cells were labelled
                    is_image = idx == raw_model.image_token_id
                    cell_logits = raw_model.llm.lm_head(extras["hidden"][is_image])
                    loss = loss + cfg.cell_words * torch.nn.functional.cross_entropy(cell_logits.float(), cells.flatten())
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
            flops += raw_model.estimate_flops(idx.size(1), images.size(1)) * idx.size(0) * dist.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad],
                                                   cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = all_reduce_mean(loss_sum / grad_accum, dist).item()  # .item() syncs: honest timing
        stop_if_not_finite(step + 1, train_loss, grad_norm, bar)
        dt = time.perf_counter() - t0
        step += 1
        record = {"step": step, "loss": round(train_loss, 6), "lr": optimizer.param_groups[0]["lr"],
                  "samples_per_s": round(cfg.batch_size / dt, 2), "mfu": round(flops / dt / peak, 4)}
        if grad_norm is not None:
            record["grad_norm"] = round(grad_norm.item(), 4)
        if due(step, cfg.eval_every, cfg.max_steps):
            record["val_loss"] = round(evaluate(), 6)
            accuracy = question_accuracy(answer, questions, dist)
            record["val_accuracy"] = round(accuracy["all"][0] / max(1, accuracy["all"][1]), 4)
            curve.append((step, record["val_accuracy"]))
        log.write(record)
        bar.set_postfix(loss=f"{train_loss:.3f}", samples_s=f"{record['samples_per_s']:.1f}", mfu=f"{record['mfu']:.1%}",
                        **({"val": f"{record['val_loss']:.3f}", "acc": f"{record['val_accuracy']:.1%}"}
                           if "val_loss" in record else {}))
        bar.update(1)
        if due(step, cfg.save_every, cfg.max_steps) and not cfg.probe:  # every rank: their RNG states are gathered
            save_checkpoint(cfg.out_dir, step, raw_model, optimizer, train_loader, tokenizer, cfg.keep_checkpoints,
                            model=raw_model.config, vision=raw_model.vision_config, train=cfg, stage="vlm")
    bar.close()
    seconds = time.perf_counter() - t_start
    captions = None
    if dist.is_master and accuracy is not None and not cfg.probe:
        print_report(accuracy, questions, cfg, seconds, record, train_loader.skipped)
        captions = show_captions(answer, val_examples, cfg.image_size, cfg.show_captions)
    teardown_distributed(dist)
    return {"model": raw_model, "tokenizer": tokenizer, "autocast": autocast, "questions": questions,
            "val_examples": val_examples, "accuracy": accuracy, "captions": captions, "seconds": seconds, "curve": curve}


def pixel_stats(examples, n_examples, cfg, n=256):
    """Channel mean and std of the first n training images, for the vision tower's standardization."""
    images = []
    for i in range(min(n, n_examples)):
        ex = examples(i) if callable(examples) else examples[i]
        try:
            images += [D.preprocess_image(D.load_image(im), cfg.image_size) for im in ex["images"]]
        except D.UserError:
            if not cfg.skip_bad:
                raise
    if not images:
        raise D.UserError("no readable training image to measure pixel statistics on")
    return D.image_channel_stats(images)


def vlm_from_llm(cfg, pixel_mean_std):
    """A new VLM around the stage-1 LLM of cfg.init (ours, or hf:DIR's Qwen3/Llama): (model, tokenizer)."""
    if hf.init_dir(cfg.init):
        llm, tokenizer = hf.load_llm(hf.init_dir(cfg.init))
    else:
        if not os.path.exists(cfg.init):
            raise D.UserError(f"no stage-1 checkpoint at --init={cfg.init}: run `python train_llm.py` first "
                              f"(or point --init at its out_dir)")
        path = find_checkpoint(cfg.init)
        with open(os.path.join(path, "config.json")) as f:
            stage = json.load(f).get("stage", "llm")
        if stage != "llm":
            raise D.UserError(f"--init={cfg.init} is a {stage} checkpoint; stage 2 starts from a stage-1 (llm) one")
        llm, _ = M.load_llm(path)
        tokenizer = D.Tokenizer.load(os.path.join(path, "tokenizer.json"))
    tokenizer = D.add_special_tokens(tokenizer, D.CHAT_TOKENS)
    M.grow_embeddings(llm, round_up(tokenizer.n_vocab, 64))  # a no-op unless tokens were added
    keypoints = 0 if cfg.oracle else cfg.answer_keypoints  # the oracle has no patches to aim at
    table = llm.config.vocab_size * cfg.vision_embd * keypoints
    if table > 50_000_000:  # a pretrained 150k vocabulary
        print(f"answer_keypoints off: their word table would hold {table / 1e6:.0f}M parameters "
              f"(vocab {llm.config.vocab_size} x tower width {cfg.vision_embd} x {keypoints})")
        keypoints = 0
    glimpse = cfg.answer_glimpse if keypoints else 0
    vision = M.VisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, n_layer=cfg.vision_layers,
                            n_embd=cfg.vision_embd, n_head=cfg.vision_heads, head_dim=cfg.vision_head_dim,
                            mlp_hidden=cfg.vision_mlp_hidden, pixel_shuffle=cfg.pixel_shuffle,
                            projector_hidden=cfg.projector_hidden, pixel_mean=tuple(pixel_mean_std[0]),
                            pixel_std=tuple(pixel_mean_std[1]), stem=cfg.vision_stem, coord_channels=cfg.coord_channels,
                            film_vocab=llm.config.vocab_size if cfg.film else 0,
                            answer_keypoints=keypoints, answer_vocab=llm.config.vocab_size if keypoints else 0,
                            answer_pairs=cfg.answer_pairs and keypoints > 1,
                            answer_glimpse=glimpse,
                            answer_glimpse_grey=cfg.answer_glimpse_grey and glimpse > 0,
                            answer_glimpse_dense=cfg.answer_glimpse_dense and glimpse > 0,
                            answer_every_token=cfg.answer_every_token and keypoints > 0,
                            answer_summary=cfg.answer_summary if keypoints else 0,
                            answer_near=cfg.answer_near and keypoints > 1,
                            answer_offsets=cfg.answer_offsets and keypoints > 0,
                            answer_fine=cfg.answer_fine and keypoints > 0,
                            fact_outputs=CELL_FEATURES if cfg.cell_facts and cfg.data == "world" and not cfg.oracle else 0)
    try:
        model = M.VLM(llm.config, vision, tokenizer.special("<|image|>"), llm=llm,
                      prompt_end_id=tokenizer.special("<|assistant|>"), prompt_start_id=tokenizer.special("<|user|>"),
                      text_end_id=tokenizer.special("<|endoftext|>"), pad_id=tokenizer.special("<|pad|>"))
    except ValueError as e:  # an impossible patch grid
        raise D.UserError(str(e)) from None
    if cfg.distinct_words and cfg.data == "world" and not hf.init_dir(cfg.init):
        from eval_sim import COLOUR_NAMES, KINDS
        rows = [tokenizer.encode(" " + w)[0] for w in [*COLOUR_NAMES, *KINDS]]
        with torch.no_grad():
            table = model.llm.embed_tokens.weight
            fresh = torch.randn(len(rows), table.size(1), generator=torch.Generator().manual_seed(cfg.seed))
            table[rows] = fresh / fresh.norm(dim=1, keepdim=True) * table[rows].norm(dim=1).mean()
    if cfg.oracle:
        model.vision, model.projector = SceneOracle(model.vision_config, model.n_visual_tokens, llm.config.n_embd,
                                                    cfg.oracle == "cells"), torch.nn.Identity()
    return model, tokenizer


class SceneOracle(torch.nn.Module):
    """--oracle's perfect eyes in place of the tower and projector: its 'image' (n, k) is the scene's true facts
    (eval_sim.scene_labels). by_cell=False: every visual token is one learned linear map of all of them. by_cell=True:
    the visual tokens are a grid over the table, each a learned linear map of what lies in its cell (per object
    whose centre is there: colour and kind one-hot, held / on / under / in a bowl / nearest, x, y; the gripper's
    presence, state, x, y) plus a learned position. A run measures how fast the LLM learns to read a scene when
    perception is solved (docs/stage2.md)."""

    def __init__(self, vision_config, n_visual_tokens, n_embd, by_cell=False):
        super().__init__()
        self.config, self.n_visual_tokens, self.by_cell = vision_config, n_visual_tokens, by_cell
        self.grid = round(n_visual_tokens ** 0.5)
        self.linear = torch.nn.Linear(CELL_FEATURES if by_cell else len(SCENE_LABEL_NAMES), n_embd)
        if by_cell:
            self.position = torch.nn.Parameter(torch.randn(n_visual_tokens, n_embd) * 0.02)

    def forward(self, facts, prompt=None, return_layers=False):
        if self.by_cell:
            tokens = self.linear(cell_facts(facts.float(), self.grid)) + self.position
        else:
            tokens = self.linear(facts.float())[:, None].expand(-1, self.n_visual_tokens, -1)
        return (tokens, [], None) if return_layers else tokens


CELL_FEATURES = 20  # cell_facts: 6 colours, 3 kinds, 5 object facts, x, y, gripper here, closed, x, y


def cell_facts_loss(predicted, facts):
    """Cross-entropy on the 0/1 facts of each cell, squared error on the x, y of the objects and gripper it holds."""
    binary = torch.ones(CELL_FEATURES, dtype=torch.bool, device=facts.device)
    binary[[14, 15, 18, 19]] = False
    loss = torch.nn.functional.binary_cross_entropy_with_logits(predicted[..., binary], facts[..., binary].clamp(0, 1))
    occupied, gripper = facts[..., :6].sum(-1, keepdim=True).clamp(max=1), facts[..., 16:17]
    return loss + ((predicted[..., 14:16] - facts[..., 14:16]) ** 2 * occupied).mean() + \
        ((predicted[..., 18:20] - facts[..., 18:20]) ** 2 * gripper).mean()


def table_cell(x, y, grid):
    """Table coordinates (x right, y up, in [0, 1]) -> the index of their cell in a grid x grid raster over the
    scene camera's image (row 0 at the top): the order of the tower's patches and of the visual tokens."""
    col, row = (x * grid).long().clamp(0, grid - 1), ((1 - y) * grid).long().clamp(0, grid - 1)
    return row * grid + col


def split_labels(labels):
    """scene_labels rows (n, 126) -> (per colour (n, 6, 19): kinds, regions, x, y, held, on, under, in bowl, nearest;
    the gripper (n, 12): closed, regions, x, y)."""
    from eval_sim import COLOUR_NAMES
    per = len(SCENE_LABEL_NAMES) - 12  # the gripper's 12 numbers come last
    return labels[:, :per].reshape(len(labels), len(COLOUR_NAMES), -1), labels[:, per:]


def ground_words():
    """The words that name one thing of a world scene, in grounding_loss's order: the six colours (each colour is one
    object or bowl), then 'gripper'."""
    from eval_sim import COLOUR_NAMES
    return [*COLOUR_NAMES, "gripper"]


def ground_word_index(tokenizer, vocab_size, verbose=True):
    """(vocab_size,) long: each token's index in ground_words(), or -1; None when no word is a single token."""
    ids = {w: tokenizer.encode(" " + w) for w in ground_words()}
    one_token = {w: i[0] for w, i in ids.items() if len(i) == 1}  # a word split in pieces cannot be found
    if not one_token:
        return None
    if len(one_token) < len(ids) and verbose:
        print(f"ground_keypoints: only {', '.join(one_token)} are single tokens; questions naming the others add no target")
    word_index = torch.full((vocab_size,), -1, dtype=torch.long)
    word_index[list(one_token.values())] = torch.tensor([ground_words().index(w) for w in one_token])
    return word_index


@torch.no_grad()
def pointing_accuracy(model, tokenizer, examples, image_size):
    """Held-out pointing of the answer keypoints: per keypoint that ground_targets supervises, the share of the
    questions naming a thing where the keypoint's most attended patch is that thing's (a probe diagnostic)."""
    word_index, device = ground_word_index(tokenizer, model.config.vocab_size, verbose=False), next(model.parameters()).device
    if word_index is None:  # no named thing can be found in the questions
        return []
    hits, counts = Counter(), Counter()
    for ex in examples:
        if ex["turns"][0][0] == D.CAPTION_PROMPT:
            continue
        idx = torch.tensor([D.encode_chat(tokenizer, ex["turns"], model.n_visual_tokens, model.config.max_seq_len)[0]],
                           device=device)
        _, _, extras = model(idx, model_view(ex, image_size)[None].to(device), return_extras=True)
        grid, fine = model.vision_config.grid, model.vision_config.answer_fine
        patch_of = thing_patches(torch.tensor(ex["labels"], device=device), grid)
        for k, (thing, has) in enumerate(ground_targets(extras["keypoints"], idx, word_index.to(device))):
            target = patch_of.gather(1, thing)
            guess = per_patch(extras["keypoints"]["patches"][..., k], grid, fine).argmax(2)
            hits[k] += ((guess == target) & has).sum().item()
            counts[k] += has.sum().item()
    return [hits[k] / max(1, counts[k]) for k in sorted(counts)]


def thing_table_xy(labels):
    """scene_labels rows (B, 126) -> (B, 7, 2): the table coordinates (x right, y up) of each of ground_words' things
    (a colour's object, the gripper)."""
    colours, gripper = split_labels(labels.float())
    return torch.cat([colours[..., -7:-5], gripper[:, None, -2:]], 1)


def thing_patches(labels, grid):
    """scene_labels rows (B, 126) -> (B, 7): the patch under each of ground_words' things."""
    xy = thing_table_xy(labels)
    return table_cell(xy[..., 0], xy[..., 1], grid)


def thing_places(labels, grid):
    """scene_labels rows (B, 126) -> (B, 7, 2): where each of ground_words' things lies in the answer keypoints'
    coordinates ([-1, 1] from the first patch centre to the last; x right, y down)."""
    xy = thing_table_xy(labels)
    return (torch.stack([xy[..., 0], 1 - xy[..., 1]], -1) * grid - 0.5) / max(grid - 1, 1) * 2 - 1


def ground_targets(keypoints, idx, word_index, named=2):
    """The world's free pointing target for the answer keypoints (--ground_keypoints): at each answer, keypoint k
    (k < named) should land on the k-th thing its question names (ground_words: an object by its colour, or the
    gripper; the last one named when the question names fewer). keypoints: AnswerKeypoints' attention; idx (B, T);
    word_index (vocab,): each token's index in ground_words() or -1. -> per keypoint k < named: (the thing's index
    in ground_words() (B, A), has a target (B, A) bool)."""
    word = word_index[idx]  # (B, T)
    is_named = keypoints["words"] & (word >= 0)[:, None]  # (B, A, T)
    count = is_named.sum(-1)  # (B, A)
    rank = is_named.long().cumsum(-1) - 1
    out = []
    for k in range(min(named, keypoints["patches"].size(-1))):
        pick = is_named & (rank == count.clamp(max=k + 1)[..., None] - 1)  # one word per answer
        out.append(((pick * word[:, None]).sum(-1), (count > 0) & keypoints["valid"]))
    return out


def named_targets(every, idx, word_index):
    """--ground_every_token: at each answer token that is itself a ground word (a caption's "red", an answer's
    "gripper"), keypoint 0 should land on that thing. every: the every-token attention (VLM.llm_inputs) -> (the
    thing's index (B, A), has a target (B, A) bool)."""
    word = word_index[idx.gather(1, every["at"])]  # (B, A)
    return word.clamp(min=0), (word >= 0) & every["valid"]


def per_patch(attention, patch_grid, fine):
    """One keypoint's attention (B, A, cells) -> (B, A, patches): with answer_fine (cells twice as fine as the
    patches) each patch's four cells summed."""
    if not fine:
        return attention
    return attention.reshape(*attention.shape[:2], patch_grid, 2, patch_grid, 2).sum((3, 5)).flatten(2)


def grounding_loss(keypoints, idx, labels, word_index, grid, named=2, every_token=False, places=False, fine=False):
    """Mean over the (answer, keypoint) pairs with a ground_targets thing of the cross-entropy over patches against
    the thing's patch; every_token: also keypoint 0's at named_targets; places: also the squared distance (in
    patches) of each such keypoint's place (AnswerKeypoints' offsets) from the thing's true centre. fine: the
    keypoints aim over answer_fine's cells (grid = twice the patch grid); the cross-entropy is still against the
    thing's patch (its four cells' mass summed) and distances still in patches, so the loss weighs what it weighed
    without them (against single cells it doubled and slowed the rest: docs/stage2.md)."""
    patch_grid = grid // 2 if fine else grid
    patch_of, place_of = thing_patches(labels, patch_grid), thing_places(labels, grid)
    targets = [(keypoints, k, *target) for k, target in enumerate(ground_targets(keypoints, idx, word_index, named))]
    if every_token and "every" in keypoints:
        targets.append((keypoints["every"], 0, *named_targets(keypoints["every"], idx, word_index)))
    losses = []
    for attention, k, thing, has in targets:
        w = per_patch(attention["patches"][..., k], patch_grid, fine)  # (B, A, patches)
        p = w.gather(2, patch_of.gather(1, thing)[..., None]).squeeze(-1)  # (B, A)
        losses.append(-(p.clamp(min=1e-8).log())[has])
        if places:
            true = place_of.gather(1, thing[..., None].expand(-1, -1, 2))  # (B, A, 2)
            error = (attention["xy"][:, :, k] - true) * (grid - 1) / 2 / (2 if fine else 1)
            losses.append(error.square().sum(-1)[has])
    losses = torch.cat(losses)
    return losses.mean() if losses.numel() else keypoints["patches"].new_zeros(())


def cell_facts(labels, grid):
    """scene_labels rows (n, 126) -> (n, grid * grid, CELL_FEATURES): per cell of a grid over the table (row-major from
    the top, the visual tokens' order), the facts of the objects and the gripper whose centre lies in it."""
    from eval_sim import COLOUR_NAMES, KINDS
    n = labels.size(0)
    out = labels.new_zeros(n, grid * grid, CELL_FEATURES)
    rows = torch.arange(n)
    colours, g = split_labels(labels)  # g: the gripper's closed, regions, x, y

    for c in range(len(COLOUR_NAMES)):
        f = colours[:, c]  # kinds, regions, x, y, held, on, under, in bowl, nearest
        present = f[:, :len(KINDS)].sum(1)  # 1 where an object has this colour
        x, y, five = f[:, -7], f[:, -6], f[:, -5:]
        one = torch.cat([torch.nn.functional.one_hot(torch.tensor(c), len(COLOUR_NAMES)).to(f).expand(n, -1),
                         f[:, :len(KINDS)], five, x[:, None], y[:, None], f.new_zeros(n, 4)], 1) * present[:, None]
        out[rows, table_cell(x, y, grid)] += one
    out[rows, table_cell(g[:, -2], g[:, -1], grid), -4:] += torch.stack([torch.ones_like(g[:, 0]), g[:, 0], g[:, -2], g[:, -1]], 1)
    return out


def world_colours():
    """The built-in world's colour names and their exact rendered RGB (eval_sim.COLOURS)."""
    from eval_sim import COLOURS
    return list(COLOURS), torch.tensor(list(COLOURS.values()))


def cell_colour_targets(images, grid, words, rgb, min_pixels=4):
    """images (B, n_images, 3, S, S) of the built-in world, in [0, 1] -> (B, n_images * grid * grid) token ids:
    for each of the grid x grid cells (row-major from the top, the visual tokens' order), words[c] for the
    colour c (rgb (n_colours, 3) ints) whose exact RGB covers most of the cell's pixels (objects, bowl rims),
    or words[-1] ('nothing') when none covers min_pixels."""
    B, n, _, S, _ = images.shape
    pixels = (images * 255).round().to(torch.int16)
    match = (pixels.unsqueeze(2) == rgb.to(pixels)[None, None, :, :, None, None]).all(3)  # (B, n, colours, S, S)
    k = S // grid
    counts = match.view(B, n, len(rgb), grid, k, grid, k).sum((4, 6))  # (B, n, colours, grid, grid)
    most, colour = counts.max(2)
    ids = torch.tensor(words, device=images.device)
    return torch.where(most >= min_pixels, ids[colour], ids[-1]).flatten(1)


def load_vlm(ckpt_dir, map_location="cpu"):
    """A stage-2 checkpoint (a run directory or a step_* directory) -> (VLM, config dict, tokenizer)."""
    path = find_checkpoint(ckpt_dir)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("stage") != "vlm":
        raise D.UserError(f"{path} is a {cfg.get('stage')} checkpoint, not a stage-2 (vlm) one")
    model = M.VLM.from_config(cfg)
    M.load_weights(model, os.path.join(path, "model.safetensors"))
    return model.to(map_location), cfg, D.Tokenizer.load(os.path.join(path, "tokenizer.json"))


# -----------------------------------------------------------------------------------------------
# The built-in world's data and the validation of answers

def world_example(index, split, image_size, turns=0, caption_block=1, caption_every=4, question_sets=1,
                  caption_colour_order=False, balance_in_bowl=False, hold_more=False, caption_one_list=False):
    """A rendered scene as one conversation: its caption when (index // caption_block) is a multiple
    of caption_every, else its questions (eval_sim.scene_questions, shuffled; the first `turns` of
    them when turns > 0). Apart, because a caption in the same conversation would give the answers
    away. With caption_block = the micro-batch and scenes read in order, captions (~100 tokens) come
    in micro-batches of their own and short questions are not padded to a caption's length."""
    from eval_sim import vlm_sample
    image, caption, qa, labels = vlm_sample(index, image_size, split, question_sets, caption_colour_order, balance_in_bowl,
                                            hold_more, caption_one_list)
    if (index // caption_block) % caption_every == 0:
        chat = [(D.CAPTION_PROMPT, caption)]
    else:
        chat = list(qa)[:turns] if turns > 0 else list(qa)
    return {"images": [image], "turns": chat, "caption": caption, "labels": [labels]}


TYPE_NAMES = list(dict.fromkeys(t for _, t in QUESTION_TYPES)) + ["other"]


def model_view(ex, image_size, oracle=False):
    """What the model is shown of an example: its images (n, 3, S, S), or with --oracle its scene facts (n, k)."""
    if oracle:
        return torch.tensor(ex["labels"])
    return torch.stack([D.preprocess_image(D.load_image(im), image_size) for im in ex["images"]])


def val_questions(examples, image_size, oracle=False):
    """Every turn of every held-out example as a question on its own: (images, question, answer, type)."""
    out = []
    for ex in examples:
        images = model_view(ex, image_size, oracle)
        out += [(images, q, a.strip(), question_type(q)) for q, a in ex["turns"] if q != D.CAPTION_PROMPT]
    return out


@torch.no_grad()
def answer_questions(model, tokenizer, items, max_new_tokens=12, autocast=None, blank=False):
    """Greedy answers to [(images, question)]: prompts of equal length share one cached generation."""
    device, eot = next(model.parameters()).device, tokenizer.eot_id
    prompts = [D.encode_chat(tokenizer, [(q, None)], images.size(0) * model.n_visual_tokens)[0] for images, q in items]
    answers = [None] * len(items)
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for rows in by_length.values():
        for chunk in (rows[k:k + 64] for k in range(0, len(rows), 64)):
            idx = torch.tensor([prompts[i] for i in chunk], device=device)
            images = torch.stack([items[i][0] for i in chunk]).to(device)
            if blank:
                images.zero_()
            with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
                out = model.generate(idx, images, max_new_tokens, temperature=0, stop_token=eot,
                                     valid_vocab=tokenizer.n_vocab)
            for i, row in zip(chunk, out[:, idx.size(1):].tolist()):
                answers[i] = tokenizer.decode(row[:row.index(eot)] if eot in row else row).strip()
    return answers


def question_accuracy(answer, questions, dist, mistakes=None):
    """{type: (correct, total)} over the held-out questions, each process answering a disjoint share.
    mistakes: a dict to fill with {type: Counter("truth -> answer")} of this process's wrong answers."""
    mine = questions[dist.rank::dist.world_size]
    predicted = answer([(images, q) for images, q, _, _ in mine])
    counts = torch.zeros(len(TYPE_NAMES), 2)
    for (_, _, truth, kind), guess in zip(mine, predicted):
        counts[TYPE_NAMES.index(kind)] += torch.tensor([float(guess == truth), 1.0])
        if mistakes is not None and guess != truth:
            mistakes.setdefault(kind, Counter())[f"{truth} -> {guess}"] += 1
    if dist.world_size > 1:
        torch_dist.all_reduce(counts)
    result = {t: (int(c), int(n)) for t, (c, n) in zip(TYPE_NAMES, counts.tolist()) if n}
    result["all"] = tuple(int(x) for x in counts.sum(0).tolist())
    return result


def answer_priors(questions):
    """{type: the most common answer's share, "all": the share a model answering each type's most common answer
    gets}: what a model that ignores the image reaches from the question text alone."""
    answers_by_type = {}
    for _, _, truth, kind in questions:
        answers_by_type.setdefault(kind, []).append(truth)
    prior = {k: max(Counter(a).values()) / len(a) for k, a in answers_by_type.items()}
    prior["all"] = sum(max(Counter(a).values()) for a in answers_by_type.values()) / len(questions)
    return prior


def print_report(accuracy, questions, cfg, seconds, record, skipped):
    """Accuracy per question type beside the most-common-answer baseline."""
    prior = answer_priors(questions)
    print(f"\nheld-out questions{' (CONTROL: images blanked)' if cfg.blank_images else ''}: "
          f"{'type':<15}{'n':>5}{'accuracy':>10}{'most common answer':>21}")
    for kind in list(accuracy):
        correct, n = accuracy[kind]
        print(f"{'':<20}{kind:<15}{n:>5}{correct / n:>10.1%}{prior[kind]:>21.1%}")
    print(f"stage 2 done in {seconds:.0f}s: val loss {record['val_loss']:.4f}, held-out question accuracy "
          f"{record['val_accuracy']:.1%}" + (f", {skipped} unreadable images skipped" if skipped else "") +
          f"; checkpoint in {cfg.out_dir}")


def caption_objects(text):
    """The objects a caption names: {(colour, kind)} for every 'red block', 'blue bowl', ... in it."""
    from eval_sim import COLOUR_NAMES
    return set(re.findall(rf"\b({'|'.join(COLOUR_NAMES)}) (block|disc|bowl)\b", text))


def caption_scores(generated, truths):
    """Object-level precision and recall of generated captions against the true ones (pooled over scenes)."""
    hit = named = true = 0
    for g, t in zip(generated, truths):
        g, t = caption_objects(g), caption_objects(t)
        hit, named, true = hit + len(g & t), named + len(g), true + len(t)
    return hit / max(1, named), hit / max(1, true)


def caption_misses(generated, truths):
    """The objects captions name wrongly, by why: (a colour in the scene with the wrong kind, a colour not in it)."""
    wrong_kind = absent = 0
    for g, t in zip(generated, truths):
        g, t = caption_objects(g), caption_objects(t)
        colours = {colour for colour, _ in t}
        wrong_kind += sum(colour in colours for colour, _ in g - t)
        absent += sum(colour not in colours for colour, _ in g - t)
    return wrong_kind, absent


def generate_captions(answer, examples, image_size, oracle=False):
    return answer([(model_view(ex, image_size, oracle), D.CAPTION_PROMPT) for ex in examples], max_new_tokens=96)


def show_captions(answer, examples, image_size, n_show=3):
    """Captions of the held-out scenes: a few printed beside the truth, and (where the truth is known,
    as for data=world) the object-level precision and recall over all of them. Returns (P, R) or None."""
    if not examples or not n_show:
        return None
    known = [ex for ex in examples if "caption" in ex]
    generated = generate_captions(answer, known or examples[:n_show], image_size)
    for ex, caption in list(zip(known or examples, generated))[:n_show]:
        print(f"caption: {caption!r}" + (f"\n  truth: {ex['caption']!r}" if "caption" in ex else ""))
    if not known:
        return None
    truths = [ex["caption"] for ex in known]
    precision, recall = caption_scores(generated, truths)
    wrong_kind, absent = caption_misses(generated, truths)
    print(f"captions of {len(known)} held-out scenes name their objects with precision {precision:.1%}, recall {recall:.1%}; "
          f"named wrongly: {wrong_kind} a colour in the scene with the wrong kind, {absent} a colour not in it")
    return precision, recall


def score(cfg):
    """--score: a trained VLM's held-out accuracy per question type on cfg.world_val scenes (its training run's
    caption order and image size), beside the most-common-answer prior, its commonest wrong answers per type, and
    its captions' precision and recall. Returns {type: (correct, total)}."""
    device = setup_distributed(cfg.device).device  # one process: the same device checks as training
    model, saved, tokenizer = load_vlm(cfg.score)
    model.to(device).eval()
    size = saved["vision"]["image_size"]
    trained = saved.get("train", {})  # its captions' order
    examples = [world_example(i, "val", size, caption_colour_order=trained.get("caption_colour_order", False),
                              caption_one_list=trained.get("caption_one_list", False)) for i in range(cfg.world_val)]
    questions = val_questions(examples, size)
    answer = functools.partial(answer_questions, model, tokenizer, autocast=autocast_context(device, resolve_dtype(device, cfg.dtype)),
                               blank=cfg.blank_images)
    mistakes = {}
    accuracy = question_accuracy(answer, questions, SimpleNamespace(rank=0, world_size=1), mistakes)
    prior = answer_priors(questions)
    print(f"{cfg.score}{' (images blanked)' if cfg.blank_images else ''}: {len(examples)} held-out scenes\n"
          f"{'type':<15}{'n':>5}{'accuracy':>10}{'prior':>8}  commonest mistakes (truth -> answer)")
    for kind, (correct, n) in accuracy.items():
        print(f"{kind:<15}{n:>5}{correct / n:>10.1%}{prior[kind]:>8.1%}  " +
              ", ".join(f"{m} ({k})" for m, k in mistakes.get(kind, Counter()).most_common(4)))
    show_captions(answer, examples, size, cfg.show_captions)
    return accuracy


def probe(cfg):
    """Train once per seed of --probe_seeds (no checkpoints), then print held-out accuracy per question type with
    the images and with them blanked at test time, beside the most-common-answer prior, and caption scores."""
    seeds = [int(s) for s in cfg.probe_seeds.split(",") if s.strip()]
    rows = []
    for seed in seeds:
        run_cfg = replace(cfg, seed=seed, show_captions=0)
        out = train(run_cfg)
        answer = functools.partial(answer_questions, out["model"], out["tokenizer"], autocast=out["autocast"])
        one = SimpleNamespace(rank=0, world_size=1)
        blank = question_accuracy(functools.partial(answer, blank=True), out["questions"], one)
        precision, recall = caption_scores(generate_captions(answer, out["val_examples"], cfg.image_size, cfg.oracle),
                                           [ex["caption"] for ex in out["val_examples"]])
        rows.append({"seed": seed, "images": out["accuracy"], "blank": blank, "caption": (precision, recall),
                     "seconds": out["seconds"]})
        pointing = ""
        hits = (pointing_accuracy(out["model"], out["tokenizer"], out["val_examples"], cfg.image_size)
                if out["model"].vision_config.answer_keypoints and cfg.data == "world" else [])
        if hits:
            pointing = ", keypoints on the named thing " + "/".join(f"{h:.0%}" for h in hits)
        print(f"probe seed {seed}: {out['accuracy']['all'][0] / out['accuracy']['all'][1]:.1%} with images, "
              f"{blank['all'][0] / blank['all'][1]:.1%} blanked, captions P {precision:.1%} R {recall:.1%}{pointing}, "
              f"{out['seconds']:.0f}s; accuracy by step " + ", ".join(f"{s} {a:.1%}" for s, a in out["curve"]), flush=True)
    print_probe_table(rows, out["questions"], cfg)
    return rows


def print_probe_table(rows, questions, cfg):
    prior = answer_priors(questions)
    seeds = ", ".join(str(r["seed"]) for r in rows)
    print(f"\nprobe: {cfg.max_steps} steps of {cfg.batch_size}, seeds {seeds}; accuracy with images per seed, "
          f"their mean, the mean with images blanked at test time, the most-common-answer prior")
    print(f"{'type':<15}{'n':>5}" + "".join(f"{'seed ' + str(r['seed']):>10}" for r in rows) +
          f"{'mean':>8}{'blanked':>9}{'prior':>8}")
    for kind in rows[0]["images"]:
        n = rows[0]["images"][kind][1]
        accs = [r["images"][kind][0] / n for r in rows]
        blank = sum(r["blank"][kind][0] / n for r in rows) / len(rows)
        print(f"{kind:<15}{n:>5}" + "".join(f"{a:>10.1%}" for a in accs) +
              f"{sum(accs) / len(accs):>8.1%}{blank:>9.1%}{prior[kind]:>8.1%}")
    print(f"{'captions P/R':<20}" + "".join(f"{r['caption'][0]:>5.0%}/{r['caption'][1]:<4.0%}" for r in rows))
    print(f"{'seconds':<20}" + "".join(f"{r['seconds']:>10.0f}" for r in rows), flush=True)


if __name__ == "__main__":
    run(main)
