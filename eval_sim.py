r"""
eval_sim.py: the built-in tabletop world. Objects, physics, rendering, language, a scripted
expert, demonstration collection, closed-loop evaluation and success statistics.

A 2D top-down table seen from above (x to the right, y to the top, both in [0, 1]):

    +----------------------------------+  y = 1     top left corner | top    | top right corner
    |  [r]         ___                 |            ----------------+--------+-----------------
    |             /   \     (b)        |            left side       | center | right side
    |   [g]      | (o) |        [y]    |            ----------------+--------+-----------------
    |             \___/     |_|        |            bottom left     | bottom | bottom right
    |   (p)              gripper       |
    +----------------------------------+  y = 0     regions: the table cut into thirds
    x = 0                           x = 1

[r] a block, (b) a disc, the ring a bowl (a flat zone: a block whose centre lies inside is "in" it),
|_| the gripper. Every colour appears at most once per scene, so "the red block" names one thing.
Physics: the gripper moves at most SPEED per step; closing it within GRASP_R of a block lifts
that block (it follows the gripper, passing over everything); opening drops it, onto another
block if one is right below (a stack), else on the table. A closed empty gripper pushes blocks,
and blocks push blocks, without interpenetration; blocks stay on the table. An open gripper hovers.
Everything is deterministic from (task, split, seed).

Tasks: reach, pick_place, push, stack, place_region, multi_place (two blocks into one bowl).
Split: each task holds out one target colour (HELD_OUT_COLOUR) and its last instruction template
(an unseen paraphrase). split="seen" never uses either; split="heldout" uses both, like LBM's
unseen tasks. Demonstrations are collected on "seen" only; the stage-1 corpus uses every template
(a pretrained LLM knows paraphrases) but only seen colour/task combinations in its instructions.

Episode format written by `collect` (read by data.EpisodeDataset):
    <root>/meta.json            cameras, image_size, state_names, action_names, fps, tasks, split
    <root>/episodes.jsonl       one line per episode: file, task, split, seed, instruction, success, length
    <root>/episodes/episode_000000.npz
        images_scene (T,H,W,3) uint8, images_wrist (T,H,W,3) uint8,
        state (T,S) float32, action (T,3) float32    (action[t] was taken after seeing frame t)
    <root>/stats.json           {"state": {...}, "action": {...}}: mean, std, min, max, q01, q99 per dim

CLI:  python eval_sim.py {collect,eval,compare,bench} --help   (pictures: figures.py)
      Bad options or files are one line and exit code 2; collect into an existing dataset needs --overwrite.
"""
import argparse
import http.client
import io
import json
import math
import os
import random
import sys
import time
import urllib.parse

import numpy as np
from tqdm import tqdm

from data import UserError, read_npz

# ----------------------------------------------------------------------------------------------
# The world's vocabulary and geometry (one definition, shared by the simulator and the corpus)

COLOURS = {  # name -> RGB; no two objects in a scene share a colour
    "red": (220, 50, 47), "green": (60, 170, 60), "blue": (45, 95, 215),
    "yellow": (235, 205, 40), "purple": (145, 70, 185), "orange": (245, 135, 30),
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ("block", "disc")  # movable objects; "block" is a square seen from above
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

OBJ_R = 0.05       # half side of a block, radius of a disc, collision radius of both
BOWL_R = 0.14      # outer radius of a bowl's rim
BOWL_IN = 0.11     # a movable object whose centre is closer than this to a bowl's centre is in it
GRIPPER_R = 0.035  # collision radius of a closed gripper when it pushes
GRASP_R = 0.07     # closing the gripper this close to an object's centre grasps it (forgiving)
STACK_R = 0.07     # dropping a block this close above another stacks it there
SPEED = 0.06       # gripper displacement for an action of 1.0 (table units per step)
REACH_R = 0.04     # reach succeeds when the gripper is this close to the target

TASKS = ["reach", "pick_place", "push", "stack", "place_region", "multi_place"]
MAX_STEPS = {"reach": 40, "pick_place": 70, "push": 70, "stack": 70, "place_region": 70,
             "multi_place": 120}
HELD_OUT_COLOUR = {"reach": "purple", "pick_place": "orange", "push": "red", "stack": "green",
                   "place_region": "blue", "multi_place": "yellow"}  # target colour never seen
PUSH_SIDES = ("left", "right", "top", "bottom")
CORNERS = ("top left", "top right", "bottom left", "bottom right")

# Instruction templates; the LAST one of each task is the held-out paraphrase.
# {t} target object, {u} second object, {b} bowl, {r} side, {c} corner.
TEMPLATES = {
    "reach": ["move the gripper to the {t}.", "reach the {t}.", "go to the {t}.",
              "touch the {t}.", "bring the gripper above the {t}."],
    "pick_place": ["put the {t} in the {b}.", "place the {t} into the {b}.",
                   "pick up the {t} and drop it in the {b}.", "move the {t} into the {b}.",
                   "transfer the {t} to the {b}."],
    "push": ["push the {t} to the {r} side of the table.", "slide the {t} to the {r} side.",
             "push the {t} toward the {r} edge.",
             "use the closed gripper to push the {t} to the {r} side.",
             "shove the {t} over to the {r} side."],
    "stack": ["stack the {t} on the {u}.", "put the {t} on top of the {u}.",
              "place the {t} onto the {u}.", "pick up the {t} and set it on the {u}.",
              "build a tower with the {t} on the {u}."],
    "place_region": ["put the {t} in the {c} corner.", "move the {t} to the {c} corner.",
                     "place the {t} in the {c} corner of the table.",
                     "carry the {t} to the {c} corner.",
                     "the {t} should end up in the {c} corner."],
    "multi_place": ["put the {t} and the {u} in the {b}.", "place the {t} and the {u} into the {b}.",
                    "move both the {t} and the {u} into the {b}.",
                    "pick up the {t} and the {u} and drop them in the {b}.",
                    "gather the {t} and the {u} in the {b}."],
}
NARRATIVES = {
    "reach": "the robot moves its gripper to the {t} and stops above it.",
    "pick_place": "the robot moves to the {t}, closes its gripper, lifts it, carries it to the {b} "
                  "and opens its gripper. now the {t} is in the {b}.",
    "push": "the robot closes its gripper beside the {t}, on the side away from the {r} edge, "
            "and pushes it to the {r} side. now the {t} is near the {r} edge.",
    "stack": "the robot moves to the {t}, closes its gripper, lifts it, carries it over the {u} "
             "and opens its gripper. now the {t} is on the {u}.",
    "place_region": "the robot moves to the {t}, closes its gripper, lifts it, carries it to the "
                    "{c} corner and opens its gripper. now the {t} is in the {c} corner.",
    "multi_place": "the robot picks up the {t} and drops it in the {b}, then picks up the {u} "
                   "and drops it in the {b} too. now both are in the {b}.",
}


def region_of(x, y):
    """Short region name on the 3x3 grid: 'top left', 'left', 'center', 'bottom', ..."""
    col = ("left", "", "right")[min(int(x * 3), 2)]
    row = ("bottom", "", "top")[min(int(y * 3), 2)]
    return " ".join(w for w in (row, col) if w) or "center"


def region_phrase(x, y):
    """The region as it appears in a sentence: 'in the top left corner', 'on the left side'."""
    r = region_of(x, y)
    if " " in r:
        return f"in the {r} corner"
    return {"left": "on the left side", "right": "on the right side", "top": "at the top",
            "bottom": "at the bottom", "center": "in the center"}[r]


# ----------------------------------------------------------------------------------------------
# Scenes: what is on the table, and the goal. Sampled from (task, split, seed) alone.

class Obj:
    __slots__ = ("kind", "colour", "x", "y", "on")

    def __init__(self, kind, colour, x, y):
        self.kind, self.colour, self.x, self.y = kind, colour, x, y
        self.on = -1  # index of the object this one is stacked on, -1 when on the table

    @property
    def name(self):
        return f"{self.colour} {self.kind}"


class Scene:
    """Objects (movable ones first, then bowls), the gripper, the task and its goal."""

    def __init__(self, task, objs, gx, gy, goal, instruction):
        self.task, self.objs, self.goal, self.instruction = task, objs, goal, instruction
        self.gx, self.gy = gx, gy
        self.closed = False
        self.held = -1  # index of the held object, -1 when empty
        self.last_move = 0.0  # distance the gripper moved in the last step

    def movables(self):
        return [i for i, o in enumerate(self.objs) if o.kind != "bowl"]

    def bowls(self):
        return [i for i, o in enumerate(self.objs) if o.kind == "bowl"]

    def in_bowl(self, i, b):
        o, bowl = self.objs[i], self.objs[b]
        return i != self.held and math.hypot(o.x - bowl.x, o.y - bowl.y) < BOWL_IN

    def top_of(self, i):
        """The object stacked on object i, or -1."""
        for j, o in enumerate(self.objs):
            if o.on == i:
                return j
        return -1


def _far_enough(x, y, placed, min_dist):
    return all(math.hypot(x - px, y - py) >= d + min_dist for px, py, d in placed)


def sample_scene(task, seed, split="seen"):
    """A reproducible initial scene for (task, split, seed): objects, gripper, goal, instruction."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    if split not in ("seen", "heldout"):
        raise UserError(f"unknown split {split!r}; use seen or heldout")
    rng = random.Random(f"{task}/{split}/{seed}")
    n_targets = {"stack": 2, "multi_place": 2}.get(task, 1)
    n_movable = rng.randint(max(2, n_targets + 1), 4)
    n_bowls = (1 + (rng.random() < 0.4)) if task in ("pick_place", "multi_place") else rng.randint(0, 1)
    held_out = HELD_OUT_COLOUR[task]  # seen: never in a goal role; heldout: always the target
    if split == "seen":
        goal_colours = rng.sample([c for c in COLOUR_NAMES if c != held_out], n_targets)
    else:
        goal_colours = [held_out] + rng.sample([c for c in COLOUR_NAMES if c != held_out], n_targets - 1)
    colours = goal_colours + rng.sample([c for c in COLOUR_NAMES if c not in goal_colours],
                                        n_movable + n_bowls - n_targets)
    goal = {"target": 0}
    if n_targets == 2:
        goal["second"] = 1
    if task in ("pick_place", "multi_place"):
        goal["bowl"] = n_movable  # the first bowl
    if task == "push":
        goal["side"] = rng.choice(PUSH_SIDES)
    if task == "place_region":
        goal["corner"] = rng.choice(CORNERS)

    for _ in range(1000):  # rejection sampling; a handful of tries in practice
        objs, placed = [], []
        for k in range(n_movable + n_bowls):
            is_bowl = k >= n_movable
            for _ in range(200):
                lo = 0.2 if is_bowl else 0.12
                x, y = rng.uniform(lo, 1 - lo), rng.uniform(lo, 1 - lo)
                if k == 0 and task == "push":  # start mid-table, room behind for the gripper
                    a, b = rng.uniform(0.5, 0.62), rng.uniform(0.25, 0.75)
                    x, y = {"left": (a, b), "right": (1 - a, b), "top": (b, 1 - a), "bottom": (b, a)}[goal["side"]]
                if task == "place_region" and region_of(x, y) == goal["corner"]:
                    continue
                if _far_enough(x, y, placed, (BOWL_R + 0.08) if is_bowl else 0.18):
                    break
            else:
                break
            objs.append(Obj("bowl" if is_bowl else rng.choice(SHAPES), colours[k], x, y))
            placed.append((x, y, BOWL_R if is_bowl else 0.0))
        if len(objs) < n_movable + n_bowls:
            continue
        for _ in range(200):  # gripper starts away from movable objects so closing grasps nothing
            gx, gy = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9)
            if all(math.hypot(gx - o.x, gy - o.y) > 0.15 for o in objs if o.kind != "bowl"):
                break
        else:
            continue
        break
    else:
        raise RuntimeError(f"could not sample a scene for {task}/{split}/{seed}")
    # shuffle so that list order (and so caption order) says nothing about the goal
    order = rng.sample(range(n_movable), n_movable) + [n_movable + k for k in rng.sample(range(n_bowls), n_bowls)]
    objs = [objs[k] for k in order]
    goal = {key: (order.index(v) if key in ("target", "second", "bowl") else v) for key, v in goal.items()}
    n_templates = len(TEMPLATES[task])
    template = n_templates - 1 if split == "heldout" else rng.randrange(n_templates - 1)
    scene = Scene(task, objs, gx, gy, goal, "")
    scene.instruction = instruction_text(scene, template)
    return scene


def goal_words(scene):
    """The slot values of the scene's goal, for templates and narratives."""
    g, objs = scene.goal, scene.objs
    words = {"t": objs[g["target"]].name}
    if "second" in g:
        words["u"] = objs[g["second"]].name
    if "bowl" in g:
        words["b"] = objs[g["bowl"]].name
    words["r"] = g.get("side", "")
    words["c"] = g.get("corner", "")
    return words


def instruction_text(scene, template):
    return TEMPLATES[scene.task][template].format(**goal_words(scene))


def is_success(scene):
    g, objs, task = scene.goal, scene.objs, scene.task
    t = objs[g["target"]]
    if task == "reach":  # "stops above it": close, and the last move was a small one
        return math.hypot(scene.gx - t.x, scene.gy - t.y) < REACH_R and scene.last_move < SPEED / 4
    if scene.held == g["target"]:
        return False
    if task == "pick_place":
        return scene.in_bowl(g["target"], g["bowl"])
    if task == "push":
        return {"left": t.x < 1 / 3, "right": t.x > 2 / 3, "top": t.y > 2 / 3, "bottom": t.y < 1 / 3}[g["side"]]
    if task == "stack":
        return t.on == g["second"]
    if task == "place_region":
        return region_of(t.x, t.y) == g["corner"]
    if task == "multi_place":
        return scene.in_bowl(g["target"], g["bowl"]) and scene.in_bowl(g["second"], g["bowl"])
    raise AssertionError(task)


# ----------------------------------------------------------------------------------------------
# Language: captions, questions and the stage-1 corpus, all read off real sampled scenes

def _plural(n, noun):
    return f"{NUMBER_WORDS[n]} {noun}" + ("" if n == 1 else "s")


def _relation(a, b):
    """Dominant-axis spatial relation of a to b as seen by the scene camera."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "below" if dy < 0 else "above"


def describe_scene(env_or_scene, colour_order=False, one_list=False):
    """A caption answerable from the scene camera: objects, regions, bowls, stacks, gripper. Objects in the scene's
    (random) order, or with colour_order in COLOUR_NAMES' order: the next one to name is then the next colour present.
    one_list (with colour_order): objects and bowls in one list by colour, not objects then bowls, and the closing
    relation between its first two things, so no colour to name hangs on which of them are bowls."""
    s = getattr(env_or_scene, "scene", env_or_scene)
    objs, mov, bowls = s.objs, s.movables(), s.bowls()
    def by_colour(i):
        return COLOUR_NAMES.index(objs[i].colour)

    one_list = colour_order and one_list
    if colour_order:
        mov, bowls = sorted(mov, key=by_colour), sorted(bowls, key=by_colour)
    things = sorted(mov + bowls, key=by_colour) if one_list else mov + bowls
    parts = [f"on the table there are {_plural(len(mov), 'object')} and {_plural(len(bowls), 'bowl')}."]
    for i in things:
        o = objs[i]
        if o.kind == "bowl":
            parts.append(f"the {o.name} is {region_phrase(o.x, o.y)}.")
        elif i == s.held:
            parts.append(f"the gripper holds the {o.name}.")
        elif o.on >= 0:
            parts.append(f"the {o.name} is on the {objs[o.on].name}.")
        elif any(s.in_bowl(i, b) for b in bowls):
            b = next(b for b in bowls if s.in_bowl(i, b))
            parts.append(f"the {o.name} is in the {objs[b].name}.")
        else:
            parts.append(f"the {o.name} is {region_phrase(o.x, o.y)}.")
    first = things if one_list else mov  # one list: the relation of its first two things
    if len(first) >= 2:
        a, b = objs[first[0]], objs[first[1]]
        parts.append(f"the {a.name} is {_relation(a, b)} the {b.name}.")
    state = "closed" if s.closed else "open"
    parts.append(f"the gripper is {state} and {region_phrase(s.gx, s.gy)}.")
    return " ".join(parts)


REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
KINDS = SHAPES + ("bowl",)
SCENE_LABEL_NAMES = [f"{c} {f}" for c in COLOUR_NAMES for f in (*KINDS, *REGIONS, "x", "y", "held", "on another",
                                                                 "under another", "in a bowl", "nearest the gripper")]
SCENE_LABEL_NAMES += ["gripper closed", *(f"gripper {r}" for r in REGIONS), "gripper x", "gripper y"]


def scene_labels(env_or_scene):
    """What the scene camera shows as numbers in [0, 1] (names: SCENE_LABEL_NAMES): per colour, its object's
    kind and region (one-hot; all zero when no object has the colour), x, y and five facts; then the
    gripper's. The built-in world's free dense target for stage 2 (train_vlm.py --scene_loss)."""
    s = getattr(env_or_scene, "scene", env_or_scene)
    objs, mov, bowls = s.objs, s.movables(), s.bowls()
    nearest = min(mov, key=lambda k: math.hypot(objs[k].x - s.gx, objs[k].y - s.gy))
    by_colour = {o.colour: i for i, o in enumerate(objs)}
    labels = []
    for colour in COLOUR_NAMES:
        one = [0.0] * (len(KINDS) + len(REGIONS) + 7)
        i = by_colour.get(colour)
        if i is not None:
            o = objs[i]
            one[KINDS.index(o.kind)] = 1.0
            one[len(KINDS) + REGIONS.index(region_of(o.x, o.y))] = 1.0
            one[-7:] = [o.x, o.y, float(i == s.held), float(o.on >= 0), float(s.top_of(i) >= 0),
                        float(o.kind != "bowl" and any(s.in_bowl(i, b) for b in bowls)), float(i == nearest)]
        labels += one
    gripper = [0.0] * len(REGIONS)
    gripper[REGIONS.index(region_of(s.gx, s.gy))] = 1.0
    return labels + [float(s.closed), *gripper, s.gx, s.gy]


def scene_questions(env_or_scene, rng, balance_in_bowl=False):
    """Question/answer pairs about the scene camera image; answers are one or two words. balance_in_bowl: where an
    object lies in a bowl, the in-bowl question asks about it half the time (training: "yes" is otherwise ~6%)."""
    s = getattr(env_or_scene, "scene", env_or_scene)
    objs, mov, bowls = s.objs, s.movables(), s.bowls()
    qa = []
    i = rng.choice(mov)
    o = objs[i]
    qa.append((f"where is the {o.name}?", region_of(o.x, o.y)))
    qa.append((f"what shape is the {o.colour} object?", o.kind))
    qa.append(("how many objects are on the table?", NUMBER_WORDS[len(mov)]))
    qa.append(("how many bowls are there?", NUMBER_WORDS[len(bowls)]))
    nearest = min(mov, key=lambda k: math.hypot(objs[k].x - s.gx, objs[k].y - s.gy))
    qa.append(("what colour is the object nearest the gripper?", objs[nearest].colour))
    qa.append(("what is the gripper holding?", "nothing" if s.held < 0 else objs[s.held].name))
    qa.append(("is the gripper open or closed?", "closed" if s.closed else "open"))
    j = rng.choice([k for k in mov if k != i])
    a, b = objs[i], objs[j]
    if abs(a.x - b.x) > 0.1:
        qa.append((f"is the {a.name} left of the {b.name}?", "yes" if a.x < b.x else "no"))
    if abs(a.y - b.y) > 0.1:
        qa.append((f"is the {a.name} above the {b.name}?", "yes" if a.y > b.y else "no"))
    if bowls:
        k = rng.choice(bowls)
        qa.append((f"what colour is the bowl {region_phrase(objs[k].x, objs[k].y)}?", objs[k].colour))
        inside = [(m, b) for m in mov for b in bowls if s.in_bowl(m, b)] if balance_in_bowl else []
        m, k = rng.choice(inside) if inside and rng.random() < 0.5 else (i, k)
        qa.append((f"is the {objs[m].name} in the {objs[k].name}?", "yes" if s.in_bowl(m, k) else "no"))
    rng.shuffle(qa)
    return qa


# question families of scene_questions, first match wins
QUESTION_TYPES = [("where is", "position"), ("what colour is the bowl", "bowl colour"),
                  ("nearest the gripper", "nearest colour"), ("how many", "count"), ("what shape", "shape"),
                  ("holding", "holding"), ("open or closed", "gripper"), ("left of", "left/above"),
                  ("above the", "left/above"), (" in the ", "in bowl")]


def question_type(question):
    return next((t for key, t in QUESTION_TYPES if key in question), "other")


def language_corpus(num_docs, seed=0, split="train", questions=3):
    """Short paragraphs about real sampled scenes: caption, Q/A, instructions, an episode narrative.

    Deterministic in (num_docs, seed, split, questions); "train" and "val" draw scenes from disjoint seeds.
    questions: Q/A lines per document (a scene has about 10).
    Instructions use every paraphrase but only seen task/colour combinations."""
    if split not in ("train", "val"):
        raise UserError(f"corpus split must be train or val, got {split!r}")
    docs = []
    for n in range(num_docs):
        scene_seed = f"corpus-{split}-{seed}-{n}"  # never equal to an integer environment seed
        rng = random.Random(scene_seed)
        task = TASKS[n % len(TASKS)]
        scene = sample_scene(task, scene_seed, "seen")
        words = goal_words(scene)
        k1, k2 = rng.sample(range(len(TEMPLATES[task])), 2)
        lines = [describe_scene(scene)]
        lines += [f"Q: {q} A: {a}." for q, a in scene_questions(scene, rng)[:questions]]
        lines.append(f"task: {TEMPLATES[task][k1].format(**words)} "
                     f"in other words: {TEMPLATES[task][k2].format(**words)}")
        lines.append(NARRATIVES[task].format(**words))
        docs.append("\n".join(lines))
    return docs


# ----------------------------------------------------------------------------------------------
# Physics: kinematic gripper, grasp/release, pushing without interpenetration

def _clamp(v, lo, hi):
    return lo if v < lo else hi if v > hi else v


def step_world(s, dx, dy, close):
    """Advance the scene by one step; dx, dy in [-1, 1] (already clipped), close a bool."""
    x0, y0 = s.gx, s.gy
    s.gx = _clamp(s.gx + dx * SPEED, 0.0, 1.0)
    s.gy = _clamp(s.gy + dy * SPEED, 0.0, 1.0)
    s.last_move = math.hypot(s.gx - x0, s.gy - y0)
    objs = s.objs
    if close and not s.closed:  # closing: grasp the nearest free-topped object within reach
        best, best_d = -1, GRASP_R
        for i in s.movables():
            d = math.hypot(objs[i].x - s.gx, objs[i].y - s.gy)
            if d < best_d and s.top_of(i) < 0:
                best, best_d = i, d
        if best >= 0:
            s.held = best
            objs[best].on = -1
    elif not close and s.closed and s.held >= 0:  # opening: drop, onto a block right below if any
        i, s.held = s.held, -1
        o = objs[i]
        o.x, o.y = _clamp(s.gx, OBJ_R, 1 - OBJ_R), _clamp(s.gy, OBJ_R, 1 - OBJ_R)
        below = [j for j in s.movables() if j != i and s.top_of(j) < 0
                 and math.hypot(objs[j].x - o.x, objs[j].y - o.y) < STACK_R]
        if below:
            o.on = min(below, key=lambda j: math.hypot(objs[j].x - o.x, objs[j].y - o.y))
    s.closed = close
    if s.held >= 0:
        objs[s.held].x, objs[s.held].y = s.gx, s.gy  # lifted: passes over everything
    _resolve_contacts(s, pusher=s.closed and s.held < 0)


def _resolve_contacts(s, pusher):
    """Separate overlapping objects on the table (Gauss-Seidel); a closed empty gripper pushes."""
    objs = s.objs
    free = [o for i, o in enumerate(objs) if o.kind != "bowl" and o.on < 0 and i != s.held]
    lo, hi = OBJ_R, 1 - OBJ_R
    for _ in range(12):
        moved = False
        if pusher:
            for o in free:
                dx, dy = o.x - s.gx, o.y - s.gy
                d = math.hypot(dx, dy)
                if d < GRIPPER_R + OBJ_R - 1e-9:
                    if d < 1e-9:
                        dx, dy, d = 1.0, 0.0, 1.0
                    k = (GRIPPER_R + OBJ_R) / d
                    o.x, o.y = _clamp(s.gx + dx * k, lo, hi), _clamp(s.gy + dy * k, lo, hi)
                    moved = True
        for a in range(len(free)):
            for b in range(a + 1, len(free)):
                p, q = free[a], free[b]
                dx, dy = q.x - p.x, q.y - p.y
                d = math.hypot(dx, dy)
                if d < 2 * OBJ_R - 1e-9:
                    if d < 1e-9:
                        dx, dy, d = 1.0, 0.0, 1.0
                    push = (2 * OBJ_R - d) / 2 / d
                    p.x, p.y = _clamp(p.x - dx * push, lo, hi), _clamp(p.y - dy * push, lo, hi)
                    q.x, q.y = _clamp(q.x + dx * push, lo, hi), _clamp(q.y + dy * push, lo, hi)
                    moved = True
        if not moved:
            break
    if pusher:  # an object pinned against the edge stops the gripper instead
        for o in free:
            dx, dy = s.gx - o.x, s.gy - o.y
            d = math.hypot(dx, dy)
            if 1e-9 < d < GRIPPER_R + OBJ_R:
                k = (GRIPPER_R + OBJ_R) / d
                s.gx, s.gy = o.x + dx * k, o.y + dy * k
    for _ in range(len(objs)):  # stacked objects ride on what is below them
        for o in objs:
            if o.on >= 0:
                o.x, o.y = objs[o.on].x, objs[o.on].y


# ----------------------------------------------------------------------------------------------
# Rendering with pillow. Both cameras share one drawing function; a camera is a centre and a zoom.
# pillow's draw calls are faster here than painting precomputed numpy masks.

TABLE_RGB, FLOOR_RGB, GRIPPER_RGB, OUTLINE_RGB = (214, 196, 160), (70, 70, 76), (40, 40, 40), (25, 25, 25)
WRIST_ZOOM = 2  # the wrist camera sees a 0.5 x 0.5 window of the table centred on the gripper


def draw_view(scene, size, cx, cy, zoom):
    """An (size, size, 3) uint8 image of the table around (cx, cy), `zoom` x the whole-table view."""
    from PIL import Image, ImageDraw
    scale = size * zoom  # pixels per table unit

    def box(x, y, rx, ry=None):  # pixel box of half-sizes rx, ry around (x, y); at least 1 pixel
        px, py = (x - cx) * scale + size / 2, (cy - y) * scale + size / 2
        rx, ry = rx * scale, (rx if ry is None else ry) * scale
        return [px - rx, py - ry, px - rx + max(2 * rx - 1, 0), py - ry + max(2 * ry - 1, 0)]

    img = Image.new("RGB", (size, size), FLOOR_RGB)
    d = ImageDraw.Draw(img)
    d.rectangle(box(0.5, 0.5, 0.5), fill=TABLE_RGB)
    objs = scene.objs
    for o in objs:
        if o.kind == "bowl":  # a coloured rim around a pale inside
            rgb = COLOURS[o.colour]
            d.ellipse(box(o.x, o.y, BOWL_R), fill=rgb)
            d.ellipse(box(o.x, o.y, BOWL_IN), fill=tuple(int(c * 0.35 + 255 * 0.65) for c in rgb))

    def height(i):  # draw order: table, then stacks bottom-up, then the held object
        h, o = 0, objs[i]
        while o.on >= 0:
            h, o = h + 1, objs[o.on]
        return 100 if i == scene.held else h

    for i in sorted(scene.movables(), key=height):
        o = objs[i]
        r = OBJ_R * (0.72 if o.on >= 0 else 1.0)  # a stacked block looks smaller: its base shows
        shape = d.rectangle if o.kind == "block" else d.ellipse
        outline = OUTLINE_RGB if r * scale >= 2.5 else None  # tiny images: colour beats outline
        shape(box(o.x, o.y, r), fill=COLOURS[o.colour], outline=outline)
    # the gripper: two fingers and a bridge, fingers wide apart when open
    r = OBJ_R * 1.3
    gap, w = (0.25 if scene.closed else 0.85) * r, 0.15 * r
    for side in (-1, 1):
        d.rectangle(box(scene.gx + side * (gap + w), scene.gy, w, r), fill=GRIPPER_RGB)
    d.rectangle(box(scene.gx, scene.gy + 0.82 * r, gap + 2 * w, 0.18 * r), fill=GRIPPER_RGB)
    return np.asarray(img)


def scene_camera(scene, size):  # the whole table
    return draw_view(scene, size, 0.5, 0.5, 1)


def render_cameras(scene, size):
    return {"scene": scene_camera(scene, size), "wrist": draw_view(scene, size, scene.gx, scene.gy, WRIST_ZOOM)}


# ----------------------------------------------------------------------------------------------
# The environment (Gymnasium-style API, no gymnasium dependency)

STATE_NAMES = ["gripper_x", "gripper_y", "gripper_closed", "holding"]
ACTION_NAMES = ["dx", "dy", "gripper"]  # gripper > 0 closes, <= 0 opens


class TabletopEnv:
    """obs = {"images": {"scene", "wrist"}: (H, W, 3) uint8, "state": (4,) float32, "instruction": str}."""

    def __init__(self, task, image_size=64, split="seen", max_steps=None, render=True):
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
        if split not in ("seen", "heldout"):
            raise UserError(f"unknown split {split!r}; use seen or heldout")
        self.task, self.split, self.image_size = task, split, image_size
        self.max_steps = max_steps or MAX_STEPS[task]
        self.render = render
        self.scene, self.seed, self.steps = None, None, 0

    def reset(self, seed=0):
        self.scene = sample_scene(self.task, seed, self.split)
        self.seed, self.steps = seed, 0
        return self._obs(), {"task": self.task, "seed": seed, "split": self.split}

    def step(self, action):
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (3,):
            raise UserError(f"action must have shape (3,) = (dx, dy, gripper), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise UserError(f"action contains NaN or inf: {a.tolist()}")
        a = np.clip(a, -1.0, 1.0)
        step_world(self.scene, float(a[0]), float(a[1]), bool(a[2] > 0))
        self.steps += 1
        success = is_success(self.scene)
        truncated = not success and self.steps >= self.max_steps
        info = {"success": success, "task": self.task, "seed": self.seed, "steps": self.steps}
        return self._obs(), float(success), success, truncated, info

    def state(self):
        s = self.scene
        return np.array([s.gx, s.gy, float(s.closed), float(s.held >= 0)], np.float32)

    def _obs(self):
        images = render_cameras(self.scene, self.image_size) if self.render else {}
        return {"images": images, "state": self.state(), "instruction": self.scene.instruction}


# ----------------------------------------------------------------------------------------------
# Policies. A policy is anything with act(obs_list) -> (N, 3) actions or (N, k, 3) chunks.

def expert_action(scene, rng, noise=0.0):
    """(clean, executed) actions of a waypoint state machine that reads the true scene.

    Stateless: the phase is read off the scene (holding? where?), so it recovers from its own
    noise and from failed grasps. `noise` is the std of Gaussian noise added to dx, dy of the
    executed action (DART-style: demonstrations store the clean action as the label)."""
    objs, g, task = scene.objs, scene.goal, scene.task
    gx, gy = scene.gx, scene.gy

    def toward(x, y, grip):
        return [_clamp((x - gx) / SPEED, -1, 1), _clamp((y - gy) / SPEED, -1, 1), grip]

    def near(x, y, r=0.02):
        return math.hypot(x - gx, y - gy) < r

    if task == "reach":
        t = objs[g["target"]]
        clean = toward(t.x, t.y, -1.0)
    elif task == "push":
        t = objs[g["target"]]
        dx, dy = {"left": (-1, 0), "right": (1, 0), "top": (0, 1), "bottom": (0, -1)}[g["side"]]
        contact = GRIPPER_R + OBJ_R + 0.005
        bx, by = t.x - dx * contact, t.y - dy * contact  # just behind the block
        along, across = (gx - t.x) * dx + (gy - t.y) * dy, (gx - t.x) * dy - (gy - t.y) * dx
        if scene.held >= 0:
            clean = toward(gx, gy, -1.0)  # grasped something by accident: let go
        elif not scene.closed:
            clean = toward(bx, by, 1.0 if near(bx, by) else -1.0)  # hover there open, then close
        elif along < -0.04 and abs(across) < 0.05:
            clean = toward(bx + dx * SPEED, by + dy * SPEED, 1.0)  # push through
        else:
            clean = toward(gx, gy, -1.0)  # lost contact: open and go around again
    else:
        # pick something up, carry it to a destination, open. multi_place does it twice.
        todo = [(g["target"], 0)] + ([(g["second"], 1)] if task == "multi_place" else [])
        if task == "multi_place":
            todo = [(i, k) for i, k in todo if not scene.in_bowl(i, g["bowl"])] or todo[-1:]
        item, k = todo[0]
        if task in ("pick_place", "multi_place"):
            b = objs[g["bowl"]]
            off = 0.0 if task == "pick_place" else (-0.055, 0.055)[k]
            dest = (b.x + off, b.y)
        elif task == "stack":
            dest = (objs[g["second"]].x, objs[g["second"]].y)
        else:  # place_region: the middle of the corner cell
            row, col = g["corner"].split()
            dest = ({"left": 1 / 6, "right": 5 / 6}[col], {"bottom": 1 / 6, "top": 5 / 6}[row])
        o = objs[item]
        if scene.held == item:
            clean = toward(dest[0], dest[1], -1.0 if near(*dest) else 1.0)
        elif scene.held >= 0:
            clean = toward(gx, gy, -1.0)  # holding the wrong object: drop it
        elif near(o.x, o.y):
            clean = toward(o.x, o.y, -1.0 if scene.closed else 1.0)  # re-open after a missed grasp
        else:
            clean = toward(o.x, o.y, -1.0)
    executed = list(clean)
    if noise > 0:
        executed[0] = _clamp(clean[0] + rng.gauss(0.0, noise), -1, 1)
        executed[1] = _clamp(clean[1] + rng.gauss(0.0, noise), -1, 1)
    return clean, executed


class ExpertPolicy:
    """The scripted expert. It is privileged: the evaluator shows it the environments via bind()."""
    name = "expert"

    def __init__(self, noise=0.2):
        self.noise, self.envs = noise, []

    def bind(self, envs):
        self.envs = envs

    def act(self, obs_list):
        out = []
        for env in self.envs:  # noise keyed by episode and step: results do not depend on batching
            rng = random.Random(f"expert/{env.task}/{env.split}/{env.seed}/{env.steps}")
            out.append(expert_action(env.scene, rng, self.noise)[1])
        return np.array(out, np.float32)


class RandomPolicy:
    name = "random"

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def act(self, obs_list):
        return self.rng.uniform(-1, 1, (len(obs_list), 3)).astype(np.float32)


class NoopPolicy:
    name = "noop"

    def act(self, obs_list):
        return np.zeros((len(obs_list), 3), np.float32)


def recent_frames(history, env, item, n):
    """The last n items of env's episode, oldest first, item the newest: a policy with n_frames of
    history calls this once per act(), so the frames are one re-plan apart, as in training. history
    maps each environment to its items (restarted when its episode does); before the episode start,
    and with env None, the first item is repeated."""
    past = [item]
    if n > 1 and env is not None:
        key = (id(env), env.task, env.split, env.seed)
        past = history[key] = ([] if env.steps == 0 else history.get(key, []))[-(n - 1):] + [item]
    return [past[0]] * (n - len(past)) + past


class HTTPPolicy:
    """A policy behind `python train_vla.py --serve=DIR` (stdlib + numpy): act() posts the observations
    as one .npz to URL/act. With n_frames > 1 it sends each environment's last n_frames observations
    (one per call, restarted each episode, as the in-process policy keeps them): the server is stateless."""
    name = "http"

    def __init__(self, url):
        self.url, self.envs, self.history, self.connection = url.rstrip("/"), None, {}, None
        self.info = json.loads(self._request("/info"))

    def bind(self, envs):
        self.envs = envs

    def _request(self, path, body=None, retry=True):
        """GET path, or POST body, on one kept-alive connection (so the server keeps one thread for it)."""
        try:
            if self.connection is None:
                parts = urllib.parse.urlsplit(self.url)
                self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
            self.connection.request("GET" if body is None else "POST", path, body)
            reply = self.connection.getresponse()
            data = reply.read()
        except (OSError, http.client.HTTPException) as e:
            self.connection = None  # a kept-alive connection the server closed is retried once, fresh
            if retry:
                return self._request(path, body, retry=False)
            raise UserError(f"policy server {self.url} unreachable: {e}") from None
        if reply.status != 200:
            raise UserError(f"policy server {self.url}: {data.decode(errors='replace')[:500]}")
        return data

    def act(self, obs_list):
        n = self.info["n_frames"]
        envs = self.envs if self.envs is not None and len(self.envs) == len(obs_list) else [None] * len(obs_list)
        past = [recent_frames(self.history, env, obs, n) for obs, env in zip(obs_list, envs)]
        arrays = {f"images/{c}": np.array([[o["images"][c] for o in p] for p in past]) for c in self.info["cameras"]}
        buf = io.BytesIO()
        np.savez(buf, state=np.array([[o["state"] for o in p] for p in past], np.float32),
                 instruction=np.array([o["instruction"] for o in obs_list]), **arrays)
        return read_npz(self._request("/act", buf.getvalue()))["actions"]


def make_policy(spec):
    if spec.startswith("http://"):
        return HTTPPolicy(spec)
    if spec == "expert":
        return ExpertPolicy()
    if spec == "random":
        return RandomPolicy()
    if spec == "noop":
        return NoopPolicy()
    if not os.path.isdir(spec):
        raise UserError(f"--policy must be a checkpoint directory, http://host:port or expert|random|noop, got {spec!r}")
    from train_vla import load_policy  # the model and tokenizer are the stage-3 side's; imported only here
    return load_policy(spec)


# ----------------------------------------------------------------------------------------------
# Statistics (numpy/stdlib only): Wilson interval, Beta posterior, Fisher's exact test

def wilson_interval(k, n, z=1.959964):
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _log_beta(a, b):
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def prob_b_beats_a(ka, na, kb, nb):
    """P(p_B > p_A) under independent Beta(1,1) priors: exact finite sum (integer parameters)."""
    a_a, b_a, a_b, b_b = 1 + ka, 1 + na - ka, 1 + kb, 1 + nb - kb
    total = 0.0
    for i in range(a_b):
        total += math.exp(_log_beta(a_a + i, b_a + b_b) - math.log(b_b + i)
                          - _log_beta(1 + i, b_b) - _log_beta(a_a, b_a))
    return total


def fisher_exact(ka, na, kb, nb):
    """Two-sided Fisher exact test p-value for successes ka/na vs kb/nb."""
    k, n = ka + kb, na + nb

    def log_p(x):  # hypergeometric: x successes in A given the margins
        return (math.lgamma(na + 1) - math.lgamma(x + 1) - math.lgamma(na - x + 1)
                + math.lgamma(nb + 1) - math.lgamma(k - x + 1) - math.lgamma(nb - k + x + 1)
                - math.lgamma(n + 1) + math.lgamma(k + 1) + math.lgamma(n - k + 1))

    observed = log_p(ka)
    p = sum(math.exp(log_p(x)) for x in range(max(0, k - nb), min(k, na) + 1)
            if log_p(x) <= observed + 1e-7)
    return min(1.0, p)


def summarize(records):
    """Per task and overall: successes, n, rate, Wilson interval; split by seen / heldout / all."""
    def cell(rs):
        k, n = sum(r["success"] for r in rs), len(rs)
        lo, hi = wilson_interval(k, n)
        return {"successes": k, "n": n, "rate": k / n if n else 0.0, "ci95": [lo, hi]}

    def by_split(rs):
        out = {s: cell([r for r in rs if r["split"] == s]) for s in ("seen", "heldout")
               if any(r["split"] == s for r in rs)}
        out["all"] = cell(rs)
        return out

    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    return {t: by_split([r for r in records if r["task"] == t]) for t in tasks}, by_split(records)


# ----------------------------------------------------------------------------------------------
# Closed-loop evaluation: a pool of environments in lockstep, one batched act() per step

EVAL_SEED = 1_000_000  # evaluation episodes use seeds EVAL_SEED + i; demonstrations use 0, 1, ...


def _frame(obs):
    return np.concatenate([obs["images"]["scene"], obs["images"]["wrist"]], axis=1)


def save_gif(frames, path, scale=2):
    from PIL import Image
    imgs = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
            for f in frames]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=100, loop=0)


def evaluate(policy, tasks=TASKS, episodes_per_task=50, splits=("seen", "heldout"), image_size=64,
             num_envs=32, gif_dir=None, gifs_per_task=1, progress=False):
    """Run episodes_per_task fixed-seed episodes per task and split; returns per-episode records."""
    jobs = [(t, s, EVAL_SEED + i) for t in tasks for s in splits for i in range(episodes_per_task)]
    gif_jobs = {(t, s, EVAL_SEED + i) for t in tasks for s in splits[:1] for i in range(gifs_per_task)}
    if gif_dir:
        os.makedirs(gif_dir, exist_ok=True)
    records, next_job = [], 0
    slots = []  # each: env, obs, queued actions, frames (for a GIF) or None
    bar = tqdm(total=len(jobs), desc="episodes", disable=not progress)
    while next_job < len(jobs) or slots:
        while len(slots) < num_envs and next_job < len(jobs):  # refill the pool
            task, split, seed = jobs[next_job]
            next_job += 1
            env = TabletopEnv(task, image_size, split)
            obs, _ = env.reset(seed)
            frames = [_frame(obs)] if gif_dir and (task, split, seed) in gif_jobs else None
            slots.append({"env": env, "obs": obs, "queue": [], "frames": frames})
        need = [sl for sl in slots if not sl["queue"]]
        if need:  # one batched forward for every environment whose action queue ran dry
            if hasattr(policy, "bind"):
                policy.bind([sl["env"] for sl in need])
            actions = np.asarray(policy.act([sl["obs"] for sl in need]), dtype=np.float32)
            if actions.ndim == 2:
                actions = actions[:, None]  # (N, 3) -> (N, 1, 3): a chunk of one
            if actions.shape[0] != len(need) or actions.shape[-1] != 3:
                raise UserError(f"policy returned actions of shape {actions.shape}, "
                                f"expected ({len(need)}, 3) or ({len(need)}, k, 3)")
            for sl, chunk in zip(need, actions):
                sl["queue"] = list(chunk)
        still = []
        for sl in slots:
            env = sl["env"]
            sl["obs"], _, terminated, truncated, info = env.step(sl["queue"].pop(0))
            if sl["frames"] is not None:
                sl["frames"].append(_frame(sl["obs"]))
            if terminated or truncated:
                records.append({"task": env.task, "split": env.split, "seed": env.seed,
                                "instruction": env.scene.instruction, "success": bool(info["success"]),
                                "steps": env.steps})
                if sl["frames"] is not None:
                    ok = "success" if info["success"] else "failure"
                    save_gif(sl["frames"], os.path.join(gif_dir, f"{env.task}_{env.split}_{env.seed}_{ok}.gif"))
                bar.update()
            else:
                still.append(sl)
        slots = still
    bar.close()
    records.sort(key=lambda r: (TASKS.index(r["task"]), r["split"] != "seen", r["seed"]))
    return records


def format_table(per_task, overall, name=""):
    def fmt(c):
        return f"{c['successes']:>4}/{c['n']:<4} {c['rate']:6.1%} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
    splits = [s for s in ("seen", "heldout", "all") if s in overall]
    lines = [f"{name:<14}" + "".join(f"{s:>32}" for s in splits)]
    for label, row in list(per_task.items()) + [("overall", overall)]:
        lines.append(f"{label:<14}" + "".join(f"{fmt(row[s]) if s in row else '-':>32}" for s in splits))
    return "\n".join(lines)


def compare_results(a, b):
    """Rows comparing two results dicts: per task (Bonferroni over tasks), then overall per split."""
    tasks = [t for t in a["tasks"] if t in b["tasks"]]
    rows = []
    for label, ca, cb, m in ([(t, a["tasks"][t]["all"], b["tasks"][t]["all"], len(tasks)) for t in tasks]
                             + [(f"overall {s}", a["overall"][s], b["overall"][s], 1)
                                for s in ("seen", "heldout", "all") if s in a["overall"] and s in b["overall"]]):
        ka, na, kb, nb = ca["successes"], ca["n"], cb["successes"], cb["n"]
        p = fisher_exact(ka, na, kb, nb)
        rows.append({"task": label, "a": [ka, na], "b": [kb, nb], "rate_a": ka / max(na, 1),
                     "rate_b": kb / max(nb, 1), "diff": kb / max(nb, 1) - ka / max(na, 1),
                     "p_b_beats_a": prob_b_beats_a(ka, na, kb, nb), "fisher_p": p,
                     "fisher_p_bonferroni": min(1.0, p * m)})
    return rows


def pool_results(results):
    """Results of several runs of one recipe (seeds) -> one results dict whose cells sum their successes and
    episodes, per task and split (what `compare A1,A2,A3 B1,B2,B3` tests); a task missing from a run is dropped."""
    tasks = [t for t in results[0]["tasks"] if all(t in r["tasks"] for r in results)]

    def pooled(cells):
        out = {}
        for s in cells[0]:
            if all(s in c for c in cells):
                k, n = sum(c[s]["successes"] for c in cells), sum(c[s]["n"] for c in cells)
                out[s] = {"successes": k, "n": n, "rate": k / n if n else 0.0, "ci95": list(wilson_interval(k, n))}
        return out
    return {"tasks": {t: pooled([r["tasks"][t] for r in results]) for t in tasks},
            "overall": pooled([r["overall"] for r in results])}


def load_results(path):
    """A results JSON written by `eval`, checked enough that compare cannot misread it."""
    try:
        with open(path) as f:
            res = json.load(f)
    except FileNotFoundError:
        raise UserError(f"results file {path} does not exist")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}")
    try:
        for cells in [res["overall"]] + list(res["tasks"].values()):
            c = cells["all"]
            if not (isinstance(c["successes"], int) and isinstance(c["n"], int) and 0 <= c["successes"] <= c["n"]):
                raise ValueError
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{path} is not an eval_sim results file (expected 'tasks' and 'overall' "
                        f"with successes <= n per split)")
    return res


# ----------------------------------------------------------------------------------------------
# Demonstrations and stage-2 samples

def run_expert_episode(task, seed, split="seen", image_size=64, noise=0.2):
    """One expert episode: frames and states seen before each action, the clean action labels."""
    env = TabletopEnv(task, image_size, split)
    obs, _ = env.reset(seed)
    frames, states, actions = [], [], []
    while True:
        rng = random.Random(f"expert/{task}/{split}/{seed}/{env.steps}")
        clean, executed = expert_action(env.scene, rng, noise)
        frames.append(obs["images"])
        states.append(obs["state"])
        actions.append(clean)
        obs, _, terminated, truncated, info = env.step(executed)
        if terminated or truncated:
            return env, frames, np.array(states, np.float32), np.array(actions, np.float32), info["success"]


def collect(out, episodes_per_task=100, tasks=TASKS, image_size=64, noise=0.2, split="seen",
            keep_failures=False, progress=True):
    """Write expert demonstrations in the episode format (see the module docstring)."""
    from data import EpisodeWriter
    writer = EpisodeWriter(out, cameras=("scene", "wrist"), image_size=image_size,
                           state_names=STATE_NAMES, action_names=ACTION_NAMES, fps=10,
                           extra={"source": "eval_sim.py collect", "split": split, "noise": noise,
                                  "tasks": list(tasks)})
    for task in tasks:
        kept, seed = 0, 0
        while kept < episodes_per_task:
            if seed > 10 * episodes_per_task + 100:
                raise RuntimeError(f"the expert keeps failing on {task}")
            env, frames, states, actions, success = run_expert_episode(task, seed, split, image_size, noise)
            if success or keep_failures:
                images = {cam: np.stack([f[cam] for f in frames]) for cam in ("scene", "wrist")}
                writer.add(images, states, actions, instruction=env.scene.instruction, task=task,
                           success=bool(success), split=split, seed=seed)
                kept += 1
            seed += 1
        if progress:
            print(f"{task}: {kept} episodes (seeds 0..{seed - 1})", file=sys.stderr)
    writer.close()
    return writer.num_episodes


def vlm_sample(index, image_size=64, split="train", question_sets=1, caption_colour_order=False, balance_in_bowl=False,
               hold_more=False, caption_one_list=False):
    """A stage-2 example: scene image (H, W, 3) uint8, its caption, question/answer pairs, scene_labels.

    The scene is caught partway through an expert episode, so some images show held objects,
    stacks and filled bowls. train and val use disjoint seeds. Only the last state is rendered
    (rendering every step of the roll-out made an example 5x slower). hold_more: half the scenes where nothing is
    held roll on (up to 40 steps) until the gripper holds something, where the task picks things up.
    caption_colour_order, caption_one_list: describe_scene's colour_order, one_list."""
    rng = random.Random(f"vlm-{split}-{index}")
    task = TASKS[index % len(TASKS)]
    env = TabletopEnv(task, image_size, "seen", render=False)
    env.reset(f"vlm-{split}-{index}")

    def roll_on(steps, until_held=False):
        for _ in range(steps):
            _, executed = expert_action(env.scene, rng, 0.2)
            _, _, terminated, truncated, _ = env.step(executed)
            if terminated or truncated or (until_held and env.scene.held >= 0):
                return

    roll_on(rng.randrange(30))
    if hold_more and env.scene.held < 0 and rng.random() < 0.5:
        roll_on(40, until_held=True)
    qa = scene_questions(env, rng, balance_in_bowl)
    for _ in range(question_sets - 1):  # more draws ask about other objects; questions already asked are dropped
        qa += [pair for pair in scene_questions(env, rng, balance_in_bowl) if pair not in qa]
    caption = describe_scene(env, caption_colour_order, caption_one_list)
    return scene_camera(env.scene, image_size), caption, qa, scene_labels(env)


def bench(steps=5000, episodes_per_task=50):
    """Environment steps per second (one process, both 64x64 cameras) and expert-eval wall time."""
    rng = np.random.default_rng(0)
    for render in (True, False):
        env = TabletopEnv("pick_place", 64, render=render)
        env.reset(0)
        t0 = time.perf_counter()
        for i in range(steps):
            _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 3))
            if terminated or truncated:
                env.reset(i)
        rate = steps / (time.perf_counter() - t0)
        print(f"env steps/s, {'both cameras 64x64' if render else 'physics only, no cameras'}: {rate:,.0f}")
    t0 = time.perf_counter()
    records = evaluate(ExpertPolicy(), episodes_per_task=episodes_per_task)
    wall = time.perf_counter() - t0
    per_task, overall = summarize(records)
    print(f"expert eval, {episodes_per_task} episodes x {len(TASKS)} tasks x 2 splits "
          f"({len(records)} episodes, {sum(r['steps'] for r in records)} steps): {wall:.1f} s, "
          f"success {overall['all']['rate']:.1%}")


# ----------------------------------------------------------------------------------------------
# Command line

def _task_list(spec):
    tasks = TASKS if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            raise UserError(f"unknown task {t!r}; tasks are {', '.join(TASKS)} (or all)")
    return tasks


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (a UserError: exit code 2), not usage text + error."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def _number(kind, lo, hi=None):
    """An argparse type: an int or float in [lo, hi] (hi None: unbounded), checked as it is parsed."""
    def parse(text):
        try:
            value = kind(text)
            ok = math.isfinite(value) and value >= lo and (hi is None or value <= hi)
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a{'n integer' if kind is int else ' number'} "
                                             f"{f'between {lo} and {hi}' if hi is not None else f'>= {lo}'}, got {text!r}")
        return value
    return parse


def main(argv=None):
    ap = _OneLineParser(
        description="The built-in tabletop world: demonstrations, closed-loop evaluation, "
                    f"comparison of results. Tasks: {', '.join(TASKS)}.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  python eval_sim.py collect --out out/sim_demos --episodes_per_task 100
  python eval_sim.py eval --policy expert --episodes_per_task 50
  python eval_sim.py eval --policy out/vla --episodes_per_task 50 --out out/eval_vla
  python eval_sim.py compare out/eval_random/results.json out/eval_expert/results.json
  python eval_sim.py bench""")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="write expert demonstrations (seen split) for stage 3")
    c.add_argument("--out", default="out/sim_demos", help="dataset directory to create")
    c.add_argument("--episodes_per_task", type=_number(int, 1), default=100, help="successful episodes per task")
    c.add_argument("--tasks", default="all", help=f"comma list of {','.join(TASKS)}, or all")
    c.add_argument("--image_size", type=_number(int, 8, 1024), default=64)
    c.add_argument("--noise", type=_number(float, 0, 1), default=0.2, help="std of injected dx,dy action noise")
    c.add_argument("--keep_failures", action="store_true", help="also keep failed episodes")
    c.add_argument("--overwrite", action="store_true", help="replace the dataset already in --out")
    e = sub.add_parser("eval", help="closed-loop evaluation; writes results.json and GIFs")
    e.add_argument("--policy", required=True, help="checkpoint directory, http://host:port (train_vla.py --serve), "
                                                    "or expert | random | noop")
    e.add_argument("--episodes_per_task", type=_number(int, 1), default=50, help="per task and per split")
    e.add_argument("--tasks", default="all", help=f"comma list of {','.join(TASKS)}, or all")
    e.add_argument("--splits", default="seen,heldout", help="comma list of seen,heldout")
    e.add_argument("--image_size", type=_number(int, 8, 1024), default=64)
    e.add_argument("--num_envs", type=_number(int, 1), default=32, help="environments stepped in lockstep")
    e.add_argument("--gifs_per_task", type=_number(int, 0), default=1, help="rollout GIFs per task (seen split)")
    e.add_argument("--out", default=None, help="output directory (default out/eval_<policy>)")
    k = sub.add_parser("compare", help="compare two results.json files (A vs B); comma-separated files on a "
                                       "side (seeds of one recipe) are pooled")
    k.add_argument("a", help="results.json, or several comma-separated")
    k.add_argument("b", help="results.json, or several comma-separated")
    b = sub.add_parser("bench", help="measure env steps/s and expert evaluation time")
    b.add_argument("--steps", type=_number(int, 1), default=5000)
    b.add_argument("--episodes_per_task", type=_number(int, 1), default=50)
    args = ap.parse_args(argv)

    if args.cmd == "collect":
        if os.path.exists(os.path.join(args.out, "meta.json")):
            if not args.overwrite:
                raise UserError(f"{args.out} already holds a dataset; choose another --out, or pass --overwrite")
            import shutil
            shutil.rmtree(args.out)
        n = collect(args.out, args.episodes_per_task, _task_list(args.tasks), args.image_size,
                    args.noise, keep_failures=args.keep_failures)
        print(f"wrote {n} episodes to {args.out}")
    elif args.cmd == "eval":
        tasks = _task_list(args.tasks)
        splits = tuple(x.strip() for x in args.splits.split(",") if x.strip())
        if not splits or any(x not in ("seen", "heldout") for x in splits):
            raise UserError(f"--splits must list seen and/or heldout, got {args.splits!r}")
        policy = make_policy(args.policy)
        name = getattr(policy, "name", os.path.basename(os.path.normpath(args.policy)))
        out = args.out or os.path.join("out", f"eval_{name}")
        os.makedirs(out, exist_ok=True)
        t0 = time.time()
        records = evaluate(policy, tasks, args.episodes_per_task, splits, args.image_size,
                           args.num_envs, os.path.join(out, "gifs"), args.gifs_per_task, progress=True)
        per_task, overall = summarize(records)
        result = {"policy": args.policy, "image_size": args.image_size,
                  "episodes_per_task": args.episodes_per_task, "splits": list(splits),
                  "seconds": round(time.time() - t0, 2), "tasks": per_task, "overall": overall,
                  "episodes": records}
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(format_table(per_task, overall, name))
        print(f"wrote {out}/results.json and GIFs in {out}/gifs ({result['seconds']} s)")
    elif args.cmd == "compare":  # comma-separated files on a side are pooled (seeds of one recipe)
        sides = [[p for p in side.split(",") if p] for side in (args.a, args.b)]
        if not all(sides):
            raise UserError("compare needs a results.json (or several, comma-separated) on each side")
        a, b = (pool_results([load_results(p) for p in side]) for side in sides)
        print(f"A = {args.a}\nB = {args.b}")
        print(f"{'task':<16}{'A':>12}{'B':>12}{'B-A':>8}{'P(B>A)':>8}{'Fisher p':>10}{'Bonf. p':>10}")
        for r in compare_results(a, b):
            print(f"{r['task']:<16}{r['a'][0]:>6}/{r['a'][1]:<5}{r['b'][0]:>6}/{r['b'][1]:<5}"
                  f"{r['diff']:>+8.3f}{r['p_b_beats_a']:>8.3f}{r['fisher_p']:>10.3g}{r['fisher_p_bonferroni']:>10.3g}")
        print("P(B>A): Beta(1,1) posteriors; Fisher p two-sided; Bonferroni over tasks (not overall rows)")
    elif args.cmd == "bench":
        bench(args.steps, args.episodes_per_task)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
