"""
figures.py: the README's pictures, drawn from a run's outputs. Kept out of the stage scripts so
they stay about training; matplotlib (the loss curve only) is an optional extra.

    python figures.py llm   --run out/llm  --out assets/stage1_loss.png    # stage 1: loss curves
    python figures.py vlm   --run out/vlm  --out assets/stage2_answers.png # stage 2: a held-out scene, answers vs truth
    python figures.py vla   --run out/vla  --out assets/stage3_rollouts.png # stage 3: the policy, one episode per task
    python figures.py world                --out assets/sim_tasks.png       # the world: the scripted expert per task
"""
import argparse
import json
import os

import numpy as np

import eval_sim
from data import UserError


def plot_llm(run, out):
    """Training loss per step and validation loss from a stage's metrics.jsonl."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: expected a run directory written by train_llm.py")
    records = [json.loads(line) for line in open(path) if line.strip()]
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the loss curve needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1, label="train")
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=4, label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", yscale="log", title=f"stage 1: {run}")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    lo, hi = min(r["loss"] for r in records), max(r["loss"] for r in records)
    ax.set_yticks([t for t in (0.1, 0.2, 0.4, 0.6, 1, 2, 4, 8) if 0.8 * lo < t < 1.2 * hi])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def text_panel(lines, width, line_height=12):
    """Lines of text drawn under each other on white: (H, width, 3) uint8. Each line is (text, rgb)."""
    from PIL import Image, ImageDraw
    panel = Image.new("RGB", (width, line_height * len(lines) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, (text, colour) in enumerate(lines):
        draw.text((4, 2 + i * line_height), text, fill=colour)
    return np.asarray(panel)


def draw_vlm(run, out, n_scenes=2, scale=4):
    """Held-out scenes of the world beside the VLM's greedy answers to their questions and the truth."""
    import train_vlm
    vlm, _, tokenizer = train_vlm.load_vlm(run)
    vlm.eval()
    size = vlm.vision_config.image_size
    rows = []
    for index in range(n_scenes):
        example = train_vlm.world_example(4 * index + 1, "val", size)  # index % 4 != 0: a question scene
        questions = train_vlm.val_questions([example], size)
        answers = train_vlm.answer_questions(vlm, tokenizer, [(im, q) for im, q, _, _ in questions])
        lines = [("question -> model answer (truth)", (0, 0, 0))]
        for (_, q, truth, _), guess in zip(questions, answers):
            ok = guess == truth
            lines.append((f"{q} -> {guess}" + ("" if ok else f" ({truth})"), (0, 120, 0) if ok else (200, 0, 0)))
        image = np.asarray(example["images"][0])
        big = image.repeat(scale, 0).repeat(scale, 1)
        panel = text_panel(lines, 420)
        h = max(big.shape[0], panel.shape[0])
        pad = lambda a: np.pad(a, ((0, h - a.shape[0]), (0, 0), (0, 0)), constant_values=255)
        rows.append(np.concatenate([pad(big), pad(panel)], axis=1))
    save_rows(rows, out)


def rollout_rows(policy, image_size, n_frames=6, seed=eval_sim.EVAL_SEED, display_size=96):
    """One row per task: frames of one episode of `policy` (act(obs_list) protocol), the scene camera
    drawn at display_size, the instruction and the outcome above."""
    rows = []
    for task in eval_sim.TASKS:
        env = eval_sim.TabletopEnv(task, image_size)
        obs, _ = env.reset(seed)
        frames, queue, done, info = [eval_sim.scene_camera(env.scene, display_size)], [], False, {}
        if hasattr(policy, "bind"):
            policy.bind([env])
        while not done:
            if not queue:
                chunk = np.asarray(policy.act([obs]), np.float32)[0]
                queue = list(chunk[None] if chunk.ndim == 1 else chunk)
            obs, _, terminated, truncated, info = env.step(queue.pop(0))
            frames.append(eval_sim.scene_camera(env.scene, display_size))
            done = terminated or truncated
        picks = np.linspace(0, len(frames) - 1, n_frames).round().astype(int)
        gap = np.full((display_size, 3, 3), 255, np.uint8)
        strip = np.concatenate([x for i in picks for x in (frames[i], gap)][:-1], axis=1)
        outcome = "success" if info.get("success") else "failure"
        title = text_panel([(f"{task}: {env.scene.instruction} ({outcome}, {env.steps} steps)", (0, 0, 0))],
                           strip.shape[1])
        rows.append(np.concatenate([title, strip], axis=0))
    return rows


def save_rows(rows, out):
    from PIL import Image
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out, optimize=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Draw the README's pictures from a run's outputs.")
    ap.add_argument("figure", choices=["llm", "vlm", "vla", "world"])
    ap.add_argument("--run", default=None, help="run directory (default out/<figure>)")
    ap.add_argument("--out", default=None, help="PNG to write (default assets/<figure>.png)")
    args = ap.parse_args(argv)
    run = args.run or os.path.join("out", args.figure)
    out = args.out or os.path.join("assets", {"llm": "stage1_loss", "vlm": "stage2_answers",
                                              "vla": "stage3_rollouts", "world": "sim_tasks"}[args.figure] + ".png")
    if args.figure == "llm":
        plot_llm(run, out)
    elif args.figure == "vlm":
        draw_vlm(run, out)
    elif args.figure == "vla":
        from train_vla import load_policy
        policy = load_policy(run, device="cpu")
        save_rows(rollout_rows(policy, policy.settings["image_size"]), out)
    else:
        save_rows(rollout_rows(eval_sim.ExpertPolicy(noise=0.0), 64), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    from train_llm import run  # one line and exit code 2 on bad input, as every CLI
    run(main)
