"""nanofoundry test suite: fast on a 2-core CPU (python -m pytest test_all.py)."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import eval_sim
import model as M
import train_llm

ROOT = os.path.dirname(os.path.abspath(__file__))
# Tiny models: one thread is faster, and immune to OpenMP spin-waits when the machine is busy.
# Subprocesses (CLI runs, torchrun) inherit it through the environment.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


# ----- stage 1: model, tokenizer, token data, training loop -----

def naive_attention(q, k, v, mask):
    """Reference attention: explicit scores, mask and softmax, heads repeated for GQA."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("path", ["causal", "bidirectional", "explicit_mask"])
def test_sdpa_attention_paths_match_naive_attention(path):
    torch.manual_seed(0)
    attn = M.Attention(n_embd=32, n_head=4, n_kv_head=2, head_dim=8, qk_norm=True, eps=1e-6)
    x = torch.randn(2, 7, 32)
    T = x.size(1)
    mask = {"causal": torch.ones(T, T).tril().bool(), "bidirectional": None,
            "explicit_mask": torch.rand(T, T) > 0.3}[path]
    if mask is not None:
        mask |= torch.eye(T, dtype=torch.bool)  # every query sees at least itself
    rope = M.rope_table(T, 8, 10000.0)
    got = attn(x, rope, mask=mask if path == "explicit_mask" else None, causal=path == "causal")
    # the same projections, then naive attention
    q = attn.q_norm(attn.q_proj(x).view(2, T, 4, 8)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(2, T, 2, 8)).transpose(1, 2)
    v = attn.v_proj(x).view(2, T, 2, 8).transpose(1, 2)
    q, k = M.apply_rope(q, *rope), M.apply_rope(k, *rope)
    want = attn.o_proj(naive_attention(q, k, v, mask).transpose(1, 2).reshape(2, T, 32))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def tiny_model(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8, mlp_hidden=64, max_seq_len=32)
    cfg.update(overrides)
    return M.Transformer(M.GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_kv_cache_decoding_equals_full_forward(tied):
    model = tiny_model(tie_embeddings=tied)
    idx = torch.randint(0, 64, (3, 12))
    full, _ = model(idx)
    cache = model.new_kv_cache(3)
    prefill, _ = model(idx[:, :5], kv_cache=cache)  # prefill 5, then one token at a time
    steps = [prefill] + [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cached_greedy_generation_equals_recomputing_the_whole_sequence():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 4))
    got = model.generate(idx, 10, temperature=0)
    seq = idx
    for _ in range(10):
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


def test_generation_never_samples_the_embedding_padding_rows():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[50:] += 10.0  # make padding rows the most likely by far
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 8, temperature=1.0, valid_vocab=50)
    assert out.max() < 50


def test_safetensors_round_trip_keeps_tied_weights_tied(tmp_path):
    model = tiny_model()
    M.save_weights(model, str(tmp_path / "w.safetensors"))
    other = tiny_model()
    torch.nn.init.zeros_(other.embed_tokens.weight)
    M.load_weights(other, str(tmp_path / "w.safetensors"))
    assert other.lm_head.weight is other.embed_tokens.weight
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n


def test_estimate_flops_is_6n_plus_the_attention_term():
    model = tiny_model()
    c = model.config
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)  # incl. tied lm_head
    assert model.estimate_flops(32) == 6 * n_matmul + 12 * c.n_layer * c.n_head * c.head_dim * 32


SAMPLE_TEXT = "the red block is left of the blue bowl. Q: what colour? A: red.\nnaïve café 東京 🤖 1234567 don't\n"


def test_tokenizer_round_trip_special_tokens_and_save_load(tmp_path):
    tok = data.Tokenizer.train([SAMPLE_TEXT * 20], vocab_size=300)
    assert tok.decode(tok.encode(SAMPLE_TEXT)) == SAMPLE_TEXT
    assert len(tok.encode("the red block")) < len("the red block".encode())  # merges happened
    ids = [tok.special(s) for s in data.SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids) and min(ids) >= len(tok.ranks) and tok.n_vocab == max(ids) + 1
    # special-token text is plain text unless allowed (a corpus cannot inject control tokens)
    assert tok.special("<|image|>") not in tok.encode("<|image|>")
    assert tok.encode("a<|image|>", allow_special=True)[-1] == tok.special("<|image|>")
    tok.save(str(tmp_path / "tokenizer.json"))
    again = data.Tokenizer.load(str(tmp_path / "tokenizer.json"))
    assert again.encode(SAMPLE_TEXT) == tok.encode(SAMPLE_TEXT) and again.special_tokens == tok.special_tokens


def test_user_tiktoken_ranks_file_loads_with_our_special_tokens(tmp_path):
    import base64
    tok = data.Tokenizer.train([SAMPLE_TEXT * 20], vocab_size=300)
    with open(tmp_path / "user.tiktoken", "w") as f:
        for b, r in tok.ranks.items():
            f.write(f"{base64.b64encode(b).decode()} {r}\n")
    user = data.Tokenizer.load(str(tmp_path / "user.tiktoken"))
    assert user.encode(SAMPLE_TEXT) == tok.encode(SAMPLE_TEXT)
    assert user.special("<|endoftext|>") == len(tok.ranks)
    (tmp_path / "bad.tiktoken").write_text("not-a-rank-line\n")
    with pytest.raises(data.UserError, match="bad.tiktoken:1"):
        data.Tokenizer.load(str(tmp_path / "bad.tiktoken"))


def test_bpe_first_merge_is_the_most_frequent_pair():
    ranks = data.train_bpe(["ab ab ab ab cd cd"], vocab_size=256 + len(data.SPECIAL_TOKENS) + 1)
    assert len(ranks) == 257 and ranks[b" a" if b" a" in ranks else b"ab"] == 256


def test_token_shards_round_trip_and_corrupt_headers_are_clear_errors(tmp_path):
    path = str(tmp_path / "s.bin")
    data.write_shard(path, np.arange(1000), vocab_size=70000)  # > 2^16: stored as uint32
    assert np.array_equal(data.read_shard(path), np.arange(1000))
    raw = bytearray(open(path, "rb").read())
    open(path, "wb").write(b"\0" * 4 + raw[4:])
    with pytest.raises(data.UserError, match="not a token shard"):
        data.read_shard(path)
    open(path, "wb").write(raw[:-10])
    with pytest.raises(data.UserError, match="truncated or corrupt"):
        data.read_shard(path)


def test_ranks_read_disjoint_data_and_two_ranks_equal_one_rank_with_accumulation(tmp_path):
    path = str(tmp_path / "s.bin")
    data.write_shard(path, np.arange(5000), vocab_size=5000)
    single = data.TokenLoader([path], batch_size=2, seq_len=8)
    r0, r1 = (data.TokenLoader([path], 2, 8, rank=r, world_size=2) for r in (0, 1))
    for _ in range(3):  # per step: 2 micro-batches on one process == 1 each on two ranks
        a, b = single.next_batch()[0], single.next_batch()[0]
        x0, x1 = r0.next_batch()[0], r1.next_batch()[0]
        assert torch.equal(a, x0) and torch.equal(b, x1)
        assert not set(x0.flatten().tolist()) & set(x1.flatten().tolist())


def test_loader_state_resumes_at_the_same_position_across_shards(tmp_path):
    paths = [str(tmp_path / f"s{i}.bin") for i in range(2)]
    for i, p in enumerate(paths):
        data.write_shard(p, np.arange(i * 1000, i * 1000 + 100), vocab_size=5000)
    loader = data.TokenLoader(paths, 2, 10)
    for _ in range(7):
        loader.next_batch()
    state = loader.state_dict()
    want = [loader.next_batch()[0] for _ in range(5)]
    again = data.TokenLoader(paths, 2, 10)
    again.load_state_dict(state)
    assert all(torch.equal(w, again.next_batch()[0]) for w in want)


def test_config_cli_parses_by_type_and_rejects_bad_input(capsys):
    cfg = train_llm.parse_config(train_llm.TrainConfig, ["--n_layer=3", "--lr=1e-3", "--compile=false", "--resume"])
    assert (cfg.n_layer, cfg.lr, cfg.compile, cfg.resume) == (3, 1e-3, False, True)
    for argv, msg in [(["--nope=1"], "unknown option --nope"), (["--n_layer=abc"], "expects a int"),
                      (["--compile=maybe"], "expects a bool"), (["n_layer=3"], "unexpected argument"),
                      (["--lr"], "needs a value")]:
        with pytest.raises(data.UserError, match=msg):
            train_llm.parse_config(train_llm.TrainConfig, argv)
    with pytest.raises(SystemExit):
        train_llm.parse_config(train_llm.TrainConfig, ["--help"])
    assert "--n_kv_head=2" in capsys.readouterr().out


TINY = ["--n_layer=2", "--n_embd=64", "--n_head=2", "--n_kv_head=1", "--head_dim=32", "--mlp_hidden=128",
        "--seq_len=32", "--micro_batch=4", "--batch_tokens=256", "--world_docs=300", "--vocab_size=320",
        "--compile=False", "--dtype=float32", "--eval_every=4", "--eval_batches=2", "--sample_every=0",
        "--warmup_steps=2", "--lr=1e-2"]


def run_cli_in_process(argv, capsys):
    """train_llm's CLI entry point as a user runs it: returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        train_llm.run(lambda: train_llm.main(argv))
    return e.value.code, capsys.readouterr().err


def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notckpt").mkdir()
    cases = [(["--data=" + str(tmp_path / "missing.txt")], "data file not found"),
             (["--data=" + str(tmp_path / "empty.txt")], "data file is empty"),
             (["--resume", "--out_dir=" + str(tmp_path / "notckpt")], "is not a checkpoint"),
             (["--unknown=1"], "unknown option --unknown")]
    for argv, msg in cases:
        code, err = run_cli_in_process(argv + [f"--data_dir={tmp_path}/d"], capsys)
        assert code == 2 and msg in err and err.count("\n") == 1, err
    # a corrupt shard in the cache: the loader names it
    out = tmp_path / "run"
    train_llm.main(TINY + [f"--out_dir={out}", "--max_steps=1"])
    shard = out / "data" / "train_000.bin"
    shard.write_bytes(b"garbage" * 300)
    code, err = run_cli_in_process(TINY + [f"--out_dir={out}", "--max_steps=1"], capsys)
    assert code == 2 and "train_000.bin is not a token shard" in err
    code, err = run_cli_in_process(TINY + [f"--out_dir={out}", "--max_steps=2", "--resume", "--n_layer=3",
                                           f"--data_dir={tmp_path}/fresh"], capsys)
    assert code == 2 and "cannot resume: the configured model differs" in err
    # and as a real process: no traceback
    proc = subprocess.run([sys.executable, "train_llm.py", "--n_layer=two"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --n_layer expects a int, got 'two'"


def load_tensors(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_resume_continues_exactly(tmp_path):
    """8 steps straight == 4 steps, stop, --resume to 8: bit-identical weights (CPU, fp32)."""
    out = str(tmp_path / "run")
    train_llm.main(TINY + [f"--out_dir={out}", "--max_steps=8", "--save_every=4", "--keep_checkpoints=5"])
    straight = load_tensors(f"{out}/step_000008/model.safetensors")
    # simulate a kill right after step 4's checkpoint, then resume
    import shutil
    shutil.rmtree(f"{out}/step_000008")
    open(f"{out}/latest", "w").write("step_000004\n")
    train_llm.main(TINY + [f"--out_dir={out}", "--max_steps=8", "--save_every=4", "--resume"])
    resumed = load_tensors(f"{out}/step_000008/model.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    steps = [json.loads(line)["step"] for line in open(f"{out}/metrics.jsonl")]
    assert steps == list(range(1, 9))  # the log reads as one run


SAVE_LOOP = """
import sys, torch, data, model as M, train_llm
from types import SimpleNamespace
m = M.Transformer(M.GPTConfig(vocab_size=4096, n_layer=4, n_embd=128, head_dim=32))
opt = torch.optim.AdamW(m.parameters())
m(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward(); opt.step()
tok = data.Tokenizer.train(["hello world"], 300)
loader = SimpleNamespace(state_dict=lambda: {})
for step in range(1, 10**6):
    train_llm.save_checkpoint(sys.argv[1], step, m, opt, loader, tok, 2, model=m.config)
    print(step, flush=True)
"""


def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    out = str(tmp_path / "ckpts")
    proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, out], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
    time.sleep(1.0)  # saving continuously: the kill lands inside a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    path = train_llm.find_checkpoint(out)
    model, cfg = M.load_llm(path)
    assert cfg["model"]["n_embd"] == 128
    torch.load(os.path.join(path, "optimizer.pt"))
    torch.load(os.path.join(path, "state.pt"), weights_only=False)


def test_torchrun_two_processes_give_the_loss_curve_of_one_process(tmp_path):
    common = TINY + ["--max_steps=4", f"--data_dir={tmp_path}/data", "--eval_every=100"]
    train_llm.main(common + [f"--out_dir={tmp_path}/one"])  # one process, grad_accum 2
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_llm.py"] + common + [f"--out_dir={tmp_path}/two", "--micro_batch=4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = lambda d: [json.loads(line)["loss"] for line in open(f"{tmp_path}/{d}/metrics.jsonl")]
    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-3, (one, two)


# ----- eval_sim: the tabletop world -----

def test_language_corpus_is_deterministic_and_val_is_disjoint_from_train():
    train = eval_sim.language_corpus(300, seed=0)
    assert train == eval_sim.language_corpus(300, seed=0)
    assert train != eval_sim.language_corpus(300, seed=1)
    val = eval_sim.language_corpus(300, split="val")
    assert not set(train) & set(val)
    assert all("Q: " in d and "task: " in d for d in train)


def test_same_seed_and_actions_give_bit_identical_observations():
    actions = np.random.default_rng(0).uniform(-1.2, 1.2, (30, 3))
    runs = []
    for _ in range(2):
        env = eval_sim.TabletopEnv("multi_place", image_size=32)
        obs, _ = env.reset(seed=7)
        trace = [obs]
        for a in actions:
            trace.append(env.step(a)[0])
        runs.append(trace)
    for o1, o2 in zip(*runs):
        assert o1["instruction"] == o2["instruction"]
        assert o1["state"].tobytes() == o2["state"].tobytes()
        for cam in ("scene", "wrist"):
            assert o1["images"][cam].tobytes() == o2["images"][cam].tobytes()


def test_observation_has_both_cameras_state_and_instruction_at_any_image_size():
    for size in (32, 64, 96):
        obs, info = eval_sim.TabletopEnv("pick_place", image_size=size).reset(seed=1)
        for cam in ("scene", "wrist"):
            assert obs["images"][cam].shape == (size, size, 3) and obs["images"][cam].dtype == np.uint8
        assert obs["state"].shape == (len(eval_sim.STATE_NAMES),) and obs["state"].dtype == np.float32
        assert isinstance(obs["instruction"], str) and obs["instruction"].endswith(".")


def test_bad_actions_raise_user_error_and_out_of_range_actions_are_clipped():
    env = eval_sim.TabletopEnv("reach")
    env.reset(seed=0)
    with pytest.raises(data.UserError, match="NaN"):
        env.step([0.0, float("nan"), 0.0])
    with pytest.raises(data.UserError, match="shape"):
        env.step([0.0, 1.0])
    a, b = eval_sim.TabletopEnv("reach"), eval_sim.TabletopEnv("reach")
    a.reset(seed=3), b.reset(seed=3)
    assert np.array_equal(a.step([5.0, -7.0, 0.5])[0]["state"], b.step([1.0, -1.0, 0.5])[0]["state"])


def test_unknown_task_or_split_raises_user_error():
    with pytest.raises(data.UserError, match="unknown task"):
        eval_sim.TabletopEnv("juggle")
    with pytest.raises(data.UserError, match="unknown split"):
        eval_sim.TabletopEnv("reach", split="test")


def test_closing_near_a_block_grasps_it_and_opening_over_the_bowl_places_it():
    env = eval_sim.TabletopEnv("pick_place", image_size=32)
    env.reset(seed=4)
    s = env.scene
    target, bowl = s.objs[s.goal["target"]], s.objs[s.goal["bowl"]]
    s.gx, s.gy = target.x + 0.03, target.y  # within the forgiving grasp radius
    obs, _, done, _, _ = env.step([0, 0, 1])
    assert obs["state"][2] == 1 and obs["state"][3] == 1 and s.held == s.goal["target"]
    s.gx, s.gy = bowl.x, bowl.y
    obs, reward, done, _, info = env.step([0, 0, 1])  # carried along with the gripper
    assert (target.x, target.y) == (bowl.x, bowl.y) and not info["success"]
    obs, reward, done, _, info = env.step([0, 0, -1])
    assert info["success"] and done and reward == 1.0 and obs["state"][3] == 0


def test_pushing_resolves_contacts_without_interpenetration_and_objects_stay_on_table():
    rng = np.random.default_rng(0)
    for seed in range(6):
        env = eval_sim.TabletopEnv("push", render=False, max_steps=10_000)
        env.reset(seed=seed)
        for _ in range(150):
            env.step([*rng.uniform(-1, 1, 2), 1.0])  # a closed gripper sweeping around
            s = env.scene
            free = [o for i, o in enumerate(s.objs) if o.kind != "bowl" and o.on < 0 and i != s.held]
            for i, p in enumerate(free):
                assert eval_sim.OBJ_R - 1e-9 <= p.x <= 1 - eval_sim.OBJ_R + 1e-9
                assert eval_sim.OBJ_R - 1e-9 <= p.y <= 1 - eval_sim.OBJ_R + 1e-9
                if s.held < 0:
                    assert math.hypot(p.x - s.gx, p.y - s.gy) >= eval_sim.GRIPPER_R + eval_sim.OBJ_R - 1e-3
                for q in free[i + 1:]:
                    assert math.hypot(p.x - q.x, p.y - q.y) >= 2 * eval_sim.OBJ_R - 1e-3


def test_expert_succeeds_on_every_task_and_split():
    records = eval_sim.evaluate(eval_sim.ExpertPolicy(), episodes_per_task=10, image_size=32)
    per_task, overall = eval_sim.summarize(records)
    assert set(per_task) == set(eval_sim.TASKS)
    for task, cells in per_task.items():
        assert cells["seen"]["rate"] == 1.0 and cells["heldout"]["rate"] == 1.0, task


def test_random_and_noop_policies_rarely_succeed():
    for policy, limit in ((eval_sim.NoopPolicy(), 0.0), (eval_sim.RandomPolicy(0), 0.1)):
        records = eval_sim.evaluate(policy, episodes_per_task=10, splits=("seen",), image_size=32)
        assert eval_sim.summarize(records)[1]["all"]["rate"] <= limit, policy.name


def test_evaluation_batches_policy_calls_and_executes_action_chunks_open_loop():
    class ChunkPolicy:  # always "stay still and open", in chunks of 4
        calls = []

        def act(self, obs_list):
            self.calls.append(len(obs_list))
            return np.zeros((len(obs_list), 4, 3), np.float32)

    policy = ChunkPolicy()
    records = eval_sim.evaluate(policy, tasks=["reach"], episodes_per_task=6, splits=("seen",),
                                image_size=32, num_envs=3)
    assert len(records) == 6 and all(r["steps"] == eval_sim.MAX_STEPS["reach"] for r in records)
    assert max(policy.calls) == 3 and len(policy.calls) == 2 * eval_sim.MAX_STEPS["reach"] // 4


def test_heldout_split_uses_only_the_unseen_colour_and_paraphrase():
    for task in eval_sim.TASKS:
        last = eval_sim.TEMPLATES[task][-1].split("{")[0]
        for seed in range(15):
            seen = eval_sim.sample_scene(task, seed, "seen")
            held = eval_sim.sample_scene(task, seed, "heldout")
            goal_colours = [seen.objs[seen.goal[k]].colour for k in ("target", "second") if k in seen.goal]
            assert eval_sim.HELD_OUT_COLOUR[task] not in goal_colours
            assert held.objs[held.goal["target"]].colour == eval_sim.HELD_OUT_COLOUR[task]
            assert held.instruction.startswith(last) and not seen.instruction.startswith(last)


def test_captions_and_questions_are_grounded_and_answers_are_short():
    image, caption, qa = eval_sim.vlm_sample(3, image_size=32)
    assert image.shape == (32, 32, 3) and qa
    env = eval_sim.TabletopEnv("stack", image_size=32)
    env.reset(seed=2)
    caption = eval_sim.describe_scene(env)
    for o in env.scene.objs:
        assert o.name in caption
    for q, a in eval_sim.scene_questions(env, random.Random(0)):
        assert q.endswith("?") and 1 <= len(a.split()) <= 2


def test_collect_then_episode_dataset_gives_windows_padding_masks_and_stats(tmp_path):
    root = str(tmp_path / "demos")
    n = eval_sim.collect(root, episodes_per_task=2, tasks=["reach", "pick_place"], image_size=32,
                         progress=False)
    assert n == 4
    stats = json.load(open(f"{root}/stats.json"))
    for key, dims in (("state", 4), ("action", 3)):
        assert set(stats[key]) == {"mean", "std", "min", "max", "q01", "q99"}
        assert all(len(v) == dims for v in stats[key].values())
    ds = data.EpisodeDataset(root, n_frames=2, chunk_size=8)
    lengths = [ep["length"] for ep in ds.episodes]
    assert len(ds) == sum(lengths)
    first, last = ds[0], ds[lengths[0] - 1]
    assert first["images"].shape == (2, 2, 32, 32, 3) and first["images"].dtype.is_floating_point is False
    assert first["state"].shape == (2, 4) and first["actions"].shape == (8, 3)
    assert (first["images"][:, 0] == first["images"][:, 1]).all()  # start padded with frame 0
    assert last["action_mask"].tolist() == [True] + [False] * 7  # end padded, masked out
    assert (last["actions"][1:] == last["actions"][0]).all()
    assert first["task"] == "reach" and first["instruction"]
    ds1 = data.EpisodeDataset(root, n_frames=1, chunk_size=4, cameras=("wrist",), episode_ids=[1])
    assert ds1[0]["images"].shape == (1, 1, 32, 32, 3) and len(ds1) == lengths[1]
    x = np.random.default_rng(0).uniform(-1, 1, (50, 3)).astype(np.float32)
    for mode in ("meanstd", "minmax", "quantile"):
        norm = data.Normalizer.from_dict(data.Normalizer(stats["action"], mode).to_dict())
        assert np.allclose(norm.unnormalize(norm.normalize(x)), x, atol=1e-6)
        t = __import__("torch").from_numpy(x)
        assert np.allclose(norm.unnormalize(norm.normalize(t)).numpy(), x, atol=1e-6)


def test_episode_dataset_reports_missing_dataset_as_user_error(tmp_path):
    with pytest.raises(data.UserError, match="not found"):
        data.EpisodeDataset(str(tmp_path))


def test_wilson_interval_matches_hand_computed_values():
    lo, hi = eval_sim.wilson_interval(45, 50)
    assert (round(lo, 3), round(hi, 3)) == (0.786, 0.957)
    lo, hi = eval_sim.wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775  # z^2 / (n + z^2)


def test_posterior_probability_b_beats_a_matches_closed_forms():
    assert math.isclose(eval_sim.prob_b_beats_a(0, 0, 1, 1), 2 / 3)  # Beta(2,1) vs uniform
    assert math.isclose(eval_sim.prob_b_beats_a(0, 1, 1, 1), 5 / 6)  # Beta(2,1) vs Beta(1,2)
    assert math.isclose(eval_sim.prob_b_beats_a(5, 10, 5, 10), 0.5)
    grid = np.linspace(0, 1, 200_001)  # numeric check: P = integral of f_B(x) F_A(x)
    f_a, f_b = grid ** 40 * (1 - grid) ** 10, grid ** 45 * (1 - grid) ** 5
    cdf_a = np.cumsum(f_a) / f_a.sum()
    assert abs(eval_sim.prob_b_beats_a(40, 50, 45, 50) - (f_b * cdf_a).sum() / f_b.sum()) < 1e-4


def test_fisher_exact_matches_known_p_values():
    assert round(eval_sim.fisher_exact(1, 10, 11, 14), 6) == 0.002759  # R: fisher.test
    assert round(eval_sim.fisher_exact(3, 4, 1, 4), 4) == 0.4857  # the tea-tasting table
    assert math.isclose(eval_sim.fisher_exact(5, 10, 5, 10), 1.0)


def _fake_results(successes, n):
    records = [{"task": task, "split": "seen", "seed": i, "success": i < k, "steps": 1}
               for task, k in successes.items() for i in range(n)]
    per_task, overall = eval_sim.summarize(records)
    return {"tasks": per_task, "overall": overall, "episodes": records}


def test_compare_on_synthetic_results_gives_known_rates_posteriors_and_bonferroni(tmp_path):
    a = _fake_results({"reach": 40, "push": 10}, 50)
    b = _fake_results({"reach": 45, "push": 10}, 50)
    rows = {r["task"]: r for r in eval_sim.compare_results(a, b)}
    assert math.isclose(rows["reach"]["diff"], 0.1) and rows["push"]["diff"] == 0
    assert math.isclose(rows["push"]["p_b_beats_a"], 0.5)
    assert rows["reach"]["p_b_beats_a"] > 0.9
    assert rows["reach"]["fisher_p_bonferroni"] == min(1.0, 2 * rows["reach"]["fisher_p"])
    assert rows["overall all"]["a"] == [50, 100] and rows["overall all"]["b"] == [55, 100]
    assert a["tasks"]["reach"]["all"]["ci95"] == list(eval_sim.wilson_interval(40, 50))
    (tmp_path / "a.json").write_text(json.dumps(a))
    assert eval_sim.load_results(str(tmp_path / "a.json"))["tasks"]["push"]["all"]["successes"] == 10


def test_bad_inputs_give_clear_user_errors(tmp_path):
    (tmp_path / "bad.json").write_text('{"tasks": 3}')
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(data.UserError, match="not an eval_sim results file"):
        eval_sim.load_results(str(tmp_path / "bad.json"))
    with pytest.raises(data.UserError, match="not valid JSON"):
        eval_sim.load_results(str(tmp_path / "broken.json"))
    with pytest.raises(data.UserError, match="not a checkpoint directory"):
        eval_sim.make_policy(str(tmp_path))
    (tmp_path / "config.json").write_text('{"n_layer": 2}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(data.UserError, match="has no action expert"):
        eval_sim.make_policy(str(tmp_path))
    with pytest.raises(data.UserError, match="unknown task"):
        eval_sim.main(["eval", "--policy", "noop", "--tasks", "reach,juggle"])


def test_cli_prints_one_error_line_and_exits_2_on_bad_input(tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2]")
    proc = subprocess.run([sys.executable, "eval_sim.py", "compare", str(tmp_path / "bad.json"),
                            str(tmp_path / "bad.json")], capture_output=True, text=True,
                           cwd=__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


# ----- stage 3: vision-language-action policy -----

import train_vla  # noqa: E402


def tiny_vlm(tokenizer, image_size=16):
    llm = M.GPTConfig(vocab_size=train_llm.round_up(tokenizer.n_vocab, 64), n_layer=2, n_embd=32, n_head=2,
                      n_kv_head=1, head_dim=16, mlp_hidden=64, max_seq_len=128)
    vision = M.VisionConfig(image_size=image_size, patch_size=8, n_layer=1, n_embd=16, n_head=2, head_dim=8,
                            mlp_hidden=32, pixel_shuffle=1, projector_hidden=32)
    return M.VLM(llm, vision, tokenizer.special("<|image|>"))


def tiny_vla(tokenizer, conditioning="prefix", chunk_size=4, n_frames=1, **expert):
    vlm = tiny_vlm(tokenizer)
    c = vlm.llm.config
    return M.VLA(vlm, M.ExpertConfig(conditioning=conditioning, n_layer=2, n_embd=24, mlp_hidden=48, n_head=2,
                                     n_kv_head=1, head_dim=16, n_frames=n_frames, chunk_size=chunk_size,
                                     n_images=2 * n_frames, vlm_n_embd=c.n_embd, vocab_size=c.vocab_size, cond_layers=2,
                                     **expert))


KEYPOINTS_ACTIONS = {"keypoints": 3, "patch_grid": 2, "patch_dim": 16, "predict": "actions",  # train_vla's options
                     "language_keypoints": True}


@pytest.fixture(scope="module")
def vla_world(tmp_path_factory):
    """A tiny stage-2 checkpoint (random weights, the format train_vlm.py writes) and 3 expert demos per task."""
    from types import SimpleNamespace
    root = tmp_path_factory.mktemp("vla")
    tokenizer = data.Tokenizer.train(eval_sim.language_corpus(60), 300)
    vlm = tiny_vlm(tokenizer)
    opt = torch.optim.AdamW(vlm.parameters())
    train_llm.save_checkpoint(str(root / "vlm"), 1, vlm, opt, SimpleNamespace(state_dict=lambda: {}), tokenizer, 1,
                              model=vlm.llm.config, vision=vlm.vision_config, stage="vlm")
    eval_sim.collect(str(root / "demos"), episodes_per_task=3, image_size=16, progress=False)
    return SimpleNamespace(root=root, tokenizer=tokenizer, vlm=str(root / "vlm"), demos=str(root / "demos"))


def vla_args(world, out, *extra):
    return [f"--init={world.vlm}", f"--demos={world.demos}", f"--out_dir={out}", "--max_steps=4", "--batch_size=4",
            "--micro_batch=2", "--expert_n_embd=24", "--expert_mlp_hidden=48", "--chunk_size=4", "--execute_steps=2",
            "--eval_episodes=0", "--val_every=2", "--val_fraction=0.2", "--warmup_steps=1", "--save_every=2",
            "--keep_checkpoints=5", "--dtype=float32", "--device=cpu", *extra]


def fake_batch(tokenizer, vla, B=3, seed=0):
    """Random observations of different instruction lengths, through the policy's own batching."""
    rng = np.random.default_rng(seed)
    n_img = vla.vlm.vision_config.image_size
    items = [{"images": rng.integers(0, 256, (2, 1, n_img, n_img, 3), dtype=np.uint8), "state": rng.random((1, 4)),
              "instruction": "put the red block in the blue bowl." + " now" * b,
              "actions": torch.randn(vla.action_expert.config.chunk_size, 3),
              "action_mask": torch.ones(vla.action_expert.config.chunk_size, dtype=torch.bool)} for b in range(B)]
    state_norm = data.Normalizer(data.episode_stats(rng.random((10, 4))))
    action_norm = data.Normalizer(data.episode_stats(rng.random((10, 3))))
    return data.vla_batch(items, tokenizer, vla.vlm.n_visual_tokens, n_img, state_norm, action_norm,
                          vla.action_expert.config.conditioning == "action_token")


@pytest.mark.parametrize("conditioning, expert", [("prefix", {}), ("action_token", {}), ("prefix", KEYPOINTS_ACTIONS),
                                                  ("action_token", KEYPOINTS_ACTIONS)])
def test_flow_matching_loss_sends_gradients_to_every_trainable_part(vla_world, conditioning, expert):
    torch.manual_seed(0)
    vla = tiny_vla(vla_world.tokenizer, conditioning, **expert)
    unused = {id(p) for p in vla.unused_parameters()}
    for p in vla.unused_parameters():
        p.requires_grad_(False)
    torch.nn.init.normal_(vla.action_expert.action_out.weight, std=0.02)  # zero at init: no gradient behind it
    batch = fake_batch(vla_world.tokenizer, vla)
    noise = torch.randn(6, 4, 3)  # 2 noise draws per sample
    loss = vla(**batch, noise=noise, t=M.sample_flow_time(6))
    assert loss.item() > 0
    loss.backward()
    for name, p in vla.named_parameters():
        if id(p) not in unused:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_language_keypoints_follow_the_instruction_and_ignore_padding(vla_world):
    torch.manual_seed(0)
    vla = tiny_vla(vla_world.tokenizer, **KEYPOINTS_ACTIONS).eval()
    enc = vla_world.tokenizer.encode
    batch = fake_batch(vla_world.tokenizer, vla, B=2)
    with torch.no_grad():
        base = vla.encode_prefix(batch["idx"], batch["images"], batch["prefix_mask"])["keypoints"]
        # another colour word in row 0: its keypoints move, row 1's stay
        idx = batch["idx"].clone()
        red = (idx[0] == enc(" red")[0]).nonzero()[0, 0]
        idx[0, red] = enc(" green")[0]
        other = vla.encode_prefix(idx, batch["images"], batch["prefix_mask"])["keypoints"]
        assert not torch.allclose(base[0], other[0], atol=1e-4) and torch.allclose(base[1], other[1])
        # padding (after row 0's prompt) is never read: changing its ids changes nothing
        idx = batch["idx"].clone()
        idx[0, ~batch["prefix_mask"][0]] = enc(" blue")[0]
        padded = vla.encode_prefix(idx, batch["images"], batch["prefix_mask"])["keypoints"]
        assert torch.equal(base, padded)


def test_loss_ignores_actions_past_the_episode_end(vla_world):
    torch.manual_seed(0)
    vla = tiny_vla(vla_world.tokenizer)
    batch = fake_batch(vla_world.tokenizer, vla)
    batch["action_mask"][:, 2:] = False
    noise, t = torch.randn(3, 4, 3), M.sample_flow_time(3)
    # other targets past the end, the same noisy input x_t = (1 - t) a + t e everywhere
    d = torch.zeros(3, 4, 3)
    d[:, 2:] = 5.0
    tt = t[:, None, None]
    changed = dict(batch, actions=batch["actions"] + d)
    same = vla(**batch, noise=noise, t=t)
    assert torch.allclose(same, vla(**changed, noise=noise - d * (1 - tt) / tt, t=t), atol=1e-5)
    assert not torch.allclose(same, vla(**changed, noise=noise, t=t), atol=1e-6)


def test_prefix_reuse_equals_recomputing_the_prefix_at_every_denoising_step(vla_world):
    torch.manual_seed(0)
    for conditioning, expert in (("prefix", {}), ("action_token", {}), ("prefix", KEYPOINTS_ACTIONS)):
        vla = tiny_vla(vla_world.tokenizer, conditioning, **expert).eval()
        batch = fake_batch(vla_world.tokenizer, vla)
        batch.pop("actions"), batch.pop("action_mask")
        noise = torch.randn(3, 4, 3)
        reuse = vla.sample_actions(**batch, noise=noise, flow_steps=10)
        full = vla.sample_actions(**batch, noise=noise, flow_steps=10, reuse_prefix=False)
        assert (reuse - full).abs().max() < 1e-5
        # padding is invisible: the shortest prompt alone gives the same chunk as inside the padded batch
        alone = vla.sample_actions(**{k: v[:1, :int(batch["prefix_mask"][0].sum())] if k in ("idx", "prefix_mask")
                                      else v[:1] for k, v in batch.items()}, noise=noise[:1], flow_steps=10)
        assert (alone - reuse[:1]).abs().max() < 1e-5


def test_sampling_is_deterministic_for_a_fixed_noise_seed(vla_world):
    torch.manual_seed(0)
    vla = tiny_vla(vla_world.tokenizer).eval()
    norm = {k: data.Normalizer(data.episode_stats(np.random.default_rng(0).uniform(-1, 1, (20, d))), "minmax").to_dict()
            for k, d in (("state", 4), ("action", 3))}
    settings = {"cameras": ["scene", "wrist"], "n_frames": 1, "chunk_size": 4, "execute_steps": 2, "flow_steps": 5,
                "image_size": 16}
    env = eval_sim.TabletopEnv("reach", 16)
    obs = [env.reset(s)[0] for s in (1, 2)]
    a = eval_sim.VLAPolicy(vla, vla_world.tokenizer, settings, norm, seed=7).act(obs)
    b = eval_sim.VLAPolicy(vla, vla_world.tokenizer, settings, norm, seed=7).act(obs)
    c = eval_sim.VLAPolicy(vla, vla_world.tokenizer, settings, norm, seed=8).act(obs)
    assert a.shape == (2, 2, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    lo, hi = norm["action"]["stats"]["min"], norm["action"]["stats"]["max"]
    assert (a >= np.array(lo) - 1e-6).all() and (a <= np.array(hi) + 1e-6).all()  # clamped to the demos' range
    # bad observations: one line naming what was expected
    policy = eval_sim.VLAPolicy(vla, vla_world.tokenizer, settings, norm)
    no_wrist = dict(obs[0], images={"scene": obs[0]["images"]["scene"]})
    with pytest.raises(data.UserError, match=r"lacks camera\(s\) \['wrist'\]"):
        policy.act([no_wrist])
    with pytest.raises(data.UserError, match=r"state has shape \(5,\), the policy expects \(4,\)"):
        policy.act([dict(obs[0], state=np.zeros(5, np.float32))])


def test_keypoint_probe_scores_a_channel_that_tracks_the_target(vla_world, tmp_path):
    rng = np.random.default_rng(0)
    targets = rng.random((50, 2))
    tracking = targets[:, ::-1] * [2, -3] + 1  # an affine image of the target (axes swapped, scaled)
    points = np.stack([tracking, rng.random((50, 2)), tracking + rng.normal(0, 0.3, (50, 2))], 1)
    r2 = train_vla.keypoint_r2(points, targets)
    assert abs(r2[0] - 1) < 1e-9 and r2[1] < 0.2 and 0.2 < r2[2] < 0.9
    # the probe of a trained policy: one R^2 per keypoint channel
    out = str(tmp_path / "run")
    train_vla.main(vla_args(vla_world, out, "--max_steps=2", "--keypoints=3", "--val_every=0"))
    r2 = train_vla.probe_keypoints(train_vla.parse_config(train_vla.TrainConfig, [f"--out_dir={out}"]), scenes_per_task=2)
    assert r2.shape == (3,) and np.all(r2 <= 1)


def test_episode_windows_pad_past_frames_with_stride_and_mask_the_end(vla_world):
    ds = data.EpisodeDataset(vla_world.demos, n_frames=3, chunk_size=6, episode_ids=[3], frame_stride=2)
    ep = ds.episodes[0]  # a pick_place episode: long enough
    T = ep["length"]
    assert T >= 6
    item = ds[4]  # frames 0, 2, 4
    assert torch.equal(item["state"], torch.from_numpy(ep["state"][[0, 2, 4]]))
    assert torch.equal(ds[1]["images"][:, 0], ds[1]["images"][:, 1])  # before the start: frame 0 repeated
    last = ds[T - 2]
    assert last["action_mask"].tolist() == [True, True] + [False] * 4
    stats = json.load(open(f"{vla_world.demos}/stats.json"))
    for mode in ("meanstd", "minmax", "quantile"):
        norm = data.Normalizer.from_dict(json.loads(json.dumps(data.Normalizer(stats["state"], mode).to_dict())))
        x = torch.from_numpy(ep["state"])
        assert torch.allclose(norm.unnormalize(norm.normalize(x)), x, atol=1e-6)


def test_vla_training_resumes_exactly_and_its_checkpoint_is_an_eval_policy(vla_world, tmp_path):
    out = str(tmp_path / "run")
    train_vla.main(vla_args(vla_world, out))
    straight = load_tensors(f"{out}/step_000004/model.safetensors")
    assert any(k.startswith("ema.") for k in straight) and any(k.startswith("policy.") for k in straight)
    import shutil
    shutil.rmtree(f"{out}/step_000004")
    open(f"{out}/latest", "w").write("step_000002\n")
    train_vla.main(vla_args(vla_world, out, "--resume"))
    resumed = load_tensors(f"{out}/step_000004/model.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    log = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "val_loss" in log[-1]
    cfg = json.load(open(f"{out}/step_000004/config.json"))
    assert cfg["policy"]["chunk_size"] == 4 and cfg["policy"]["execute_steps"] == 2
    assert set(cfg["normalization"]) >= {"state", "action"} and cfg["action_expert"]["chunk_size"] == 4
    policy = eval_sim.load_policy(out)  # the run directory: its latest checkpoint, EMA weights
    records = eval_sim.evaluate(policy, tasks=["reach"], episodes_per_task=2, splits=("seen",), image_size=16)
    assert len(records) == 2


def test_bad_stage2_checkpoints_and_options_are_one_line_errors(vla_world, tmp_path, capsys):
    def cli(argv):
        with pytest.raises(SystemExit) as e:
            train_llm.run(lambda: train_vla.main(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        return err
    base = vla_args(vla_world, tmp_path / "out")
    assert "train one with `python train_vlm.py`" in cli(base + [f"--init={tmp_path}/missing"])
    llm_dir = tmp_path / "llm"  # a stage-1 checkpoint where a stage-2 one belongs
    import shutil
    shutil.copytree(vla_world.vlm, llm_dir)
    ckpt = train_llm.find_checkpoint(str(llm_dir))
    cfg = json.load(open(f"{ckpt}/config.json"))
    json.dump({k: v for k, v in cfg.items() if k != "vision"} | {"stage": "llm"}, open(f"{ckpt}/config.json", "w"))
    assert "without a vision tower" in cli(base + [f"--init={llm_dir}"])
    json.dump(cfg | {"vision": cfg["vision"] | {"n_embd": 24}}, open(f"{ckpt}/config.json", "w"))
    assert "do not match its config.json" in cli(base + [f"--init={llm_dir}"])
    assert "--execute_steps=9" in cli(base + ["--execute_steps=9"])
    assert "--conditioning=cross" in cli(base + ["--conditioning=cross"])


def test_torchrun_two_processes_train_the_vla(vla_world, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_vla.py"] + vla_args(vla_world, tmp_path / "ddp", "--micro_batch=1", "--max_steps=2"),
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)


# ----- stage 2: vision-language model -----
import tarfile  # noqa: E402

import train_vlm  # noqa: E402


def small_vlm(image_token_id=60):
    torch.manual_seed(0)
    llm = M.GPTConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8, mlp_hidden=64, max_seq_len=64)
    vision = M.VisionConfig(image_size=16, patch_size=4, n_layer=1, n_embd=16, n_head=2, head_dim=8, mlp_hidden=32,
                            pixel_shuffle=2, projector_hidden=32)
    return M.VLM(llm, vision, image_token_id).eval()


def test_image_embeddings_land_exactly_on_their_placeholders_for_several_images_and_mixed_lengths():
    vlm, P = small_vlm(), 60
    n = vlm.n_visual_tokens  # 4
    # row 0: short text, 2 images, long padding; row 1: longer text before the images, text between them
    row0 = [1, 2] + [P] * n + [P] * n + [3, 4] + [0] * 5
    row1 = [1, 2, 5, 6, 7] + [P] * n + [8, 9, 10] + [P] * n + [11]
    assert len(row0) == len(row1)
    idx, images = torch.tensor([row0, row1]), torch.randn(2, 2, 3, 16, 16)
    x = vlm.embed(idx, images)
    per_image = vlm.projector(vlm.vision(images.flatten(0, 1))).view(2, 2, n, -1)  # (B, n_images, n, C)
    for b, row in enumerate([row0, row1]):
        slots = [t for t, tok in enumerate(row) if tok == P]
        torch.testing.assert_close(x[b, slots[:n]], per_image[b, 0])
        torch.testing.assert_close(x[b, slots[n:]], per_image[b, 1])
        text = [t for t, tok in enumerate(row) if tok != P]
        torch.testing.assert_close(x[b, text], vlm.llm.embed_tokens(idx[b, text]))
    one_missing = [t if i != 5 else 0 for i, t in enumerate(row1)]
    with pytest.raises(ValueError, match="row 1 has 7 <\\|image\\|> placeholders, expected 2 image"):
        vlm.embed(torch.tensor([row0, one_missing]), images)


class CharTokenizer(data.Tokenizer):
    """The data.Tokenizer interface over single bytes: fast to build for tests."""

    def __init__(self):
        super().__init__({bytes([i]): i for i in range(256)})


def test_loss_counts_only_answer_tokens_and_their_end_token():
    tok = CharTokenizer()
    turns = [("what colour?", "red"), ("where?", "top left")]
    ids, mask = data.encode_chat(tok, turns, n_image_tokens=4)
    answers = [tok.decode([i]) for i, m in zip(ids, mask) if m]
    assert "".join(answers) == " red<|endoftext|> top left<|endoftext|>"
    assert ids.count(tok.special("<|image|>")) == 4
    loader = data.ImageTextLoader([{"images": [np.zeros((16, 16, 3), np.uint8)], "turns": turns}], tok, 1, 128, 16, 4,
                                  shuffle=False)
    idx, targets, images = loader.next_batch()
    assert torch.equal(idx[0, :len(ids) - 1], torch.tensor(ids[:-1]))
    assert (targets[0] != -1).sum() == sum(mask)
    torch.manual_seed(0)
    llm = M.GPTConfig(vocab_size=tok.n_vocab, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, head_dim=16, mlp_hidden=64,
                      max_seq_len=128)
    vision = M.VisionConfig(image_size=16, patch_size=4, n_layer=1, n_embd=16, n_head=2, head_dim=8, mlp_hidden=32,
                            projector_hidden=32)
    vlm = M.VLM(llm, vision, tok.special("<|image|>"))
    logits, loss = vlm(idx, images, targets)
    keep = targets[0] != -1
    assert torch.allclose(loss, F.cross_entropy(logits[0, keep], targets[0, keep]))
    # what the prompt positions would predict is irrelevant: give them any targets, masked, same loss
    other = torch.where(keep, targets[0], torch.randint(0, 256, keep.shape)).unsqueeze(0)
    assert torch.equal(vlm(idx, images, other.masked_fill(~keep, -1))[1], loss)
    assert not torch.allclose(vlm(idx, images, other)[1], loss)  # unmasked prompt targets would count


def test_cached_vlm_generation_equals_recomputing_the_whole_sequence():
    vlm = small_vlm()
    idx = torch.tensor([[1, 2] + [60] * 4 + [3, 4], [5] + [60] * 4 + [6, 7, 8]])
    images = torch.randn(2, 1, 3, 16, 16)
    got = vlm.generate(idx, images, 10, temperature=0, valid_vocab=60)
    seq = idx
    for _ in range(10):
        logits, _ = vlm(seq, images)
        seq = torch.cat([seq, logits[:, -1, :60].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


def test_vlm_flops_and_parameter_counts_by_part():
    vlm = small_vlm()
    counts = vlm.param_counts()
    assert sum(counts.values()) == sum(p.numel() for p in vlm.parameters())
    assert counts["llm"] == vlm.llm.num_params()
    assert vlm.estimate_flops(20, n_images=2) > 20 * vlm.llm.estimate_flops(20)


def test_growing_the_embedding_keeps_old_rows_and_ties():
    llm = tiny_model()
    old = llm.embed_tokens.weight.detach().clone()
    M.grow_embeddings(llm, 128)
    assert llm.embed_tokens.weight.shape == (128, 32) and llm.lm_head.weight is llm.embed_tokens.weight
    assert torch.equal(llm.embed_tokens.weight[:64], old) and llm.config.vocab_size == 128
    tok = data.add_special_tokens(data.Tokenizer({bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256}),
                                  data.CHAT_TOKENS)
    assert tok.special("<|endoftext|>") == 256 and tok.special("<|assistant|>") == 260 and tok.n_vocab == 261


def write_png(path, colour, size=(20, 12)):
    from PIL import Image
    Image.new("RGB", size, colour).save(path)


def test_jsonl_and_tar_readers_and_a_corrupt_image_is_named_or_skipped(tmp_path):
    write_png(tmp_path / "a.png", (255, 0, 0))
    write_png(tmp_path / "b.png", (0, 0, 255))
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    conv = [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "blue"},
            {"from": "human", "value": "sure?"}, {"from": "gpt", "value": "yes"}]
    lines = [{"image": "a.png", "text": "a red square"}, {"image": "b.png", "conversations": conv},
             {"image": "bad.png", "text": "broken"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    jsonl = data.read_image_text_jsonl(str(tmp_path / "d.jsonl"))
    assert jsonl[0]["turns"] == [(data.CAPTION_PROMPT, "a red square")]
    assert jsonl[1]["turns"] == [("what colour?", "blue"), ("sure?", "yes")]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        tar.add(tmp_path / "a.png", "x/s0.png")
        (tmp_path / "s0.json").write_text(json.dumps({"conversations": conv[:2]}))
        tar.add(tmp_path / "s0.json", "x/s0.json")
        tar.add(tmp_path / "b.png", "x/s1.png")
        (tmp_path / "s1.txt").write_text("a blue square\n")
        tar.add(tmp_path / "s1.txt", "x/s1.txt")
    shard = data.read_image_text_tar(str(tmp_path / "s.tar"))
    assert [ex["turns"] for ex in shard] == [[("what colour?", "blue")], [(data.CAPTION_PROMPT, "a blue square")]]
    pixels = data.load_image(shard[1]["images"][0])
    assert pixels.shape == (12, 20, 3) and tuple(pixels[0, 0]) == (0, 0, 255)
    x = data.preprocess_image(pixels, 16)  # 20 x 12 -> 16 x 10 in [0, 1], centred on mid-grey padding
    assert x.shape == (3, 16, 16) and (x[:, :3] == 0.5).all() and x[2, 8, 8] == 1.0 and x[0, 8, 8] == 0.0
    examples = jsonl + shard
    tok = CharTokenizer()
    make = lambda **kw: data.ImageTextLoader(examples, tok, 5, 64, 16, 4, shuffle=False, **kw)
    with pytest.raises(data.UserError, match="cannot read image .*bad.png"):
        make().next_batch()
    loader = make(skip_bad=True)
    idx, targets, images = loader.next_batch()
    assert images.shape == (5, 1, 3, 16, 16) and loader.skipped == 1
    with pytest.raises(data.UserError, match=r"d2.jsonl:1: expected a string 'text'"):
        (tmp_path / "d2.jsonl").write_text('{"image": "a.png", "conversations": [{"from": "gpt"}]}\n')
        data.read_image_text_jsonl(str(tmp_path / "d2.jsonl"))


@pytest.fixture(scope="module")
def tiny_llm_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm") / "llm"
    train_llm.main(TINY + ["--seq_len=64", "--batch_tokens=256", f"--out_dir={out}", "--max_steps=1"])
    return str(out)


def tiny_vlm_args(init, out):
    return [f"--init={init}", f"--out_dir={out}", "--image_size=16", "--patch_size=4", "--vision_layers=1",
            "--vision_embd=16", "--vision_heads=2", "--vision_head_dim=8", "--vision_mlp_hidden=32",
            "--projector_hidden=32", "--seq_len=48", "--batch_size=4", "--micro_batch=2", "--world_val=4",
            "--compile=False", "--dtype=float32", "--eval_every=100", "--eval_batches=1", "--show_captions=1",
            "--warmup_steps=2", "--lr=1e-2"]


def test_vlm_resume_continues_exactly(tiny_llm_checkpoint, tmp_path):
    out = str(tmp_path / "vlm")
    args = tiny_vlm_args(tiny_llm_checkpoint, out) + ["--max_steps=6", "--save_every=3", "--keep_checkpoints=5"]
    train_vlm.main(args)
    straight = load_tensors(f"{out}/step_000006/model.safetensors")
    import shutil
    shutil.rmtree(f"{out}/step_000006")
    open(f"{out}/latest", "w").write("step_000003\n")
    train_vlm.main(args + ["--resume"])
    resumed = load_tensors(f"{out}/step_000006/model.safetensors")
    assert straight.keys() == resumed.keys() and any(k.startswith("vision.") for k in straight)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert [json.loads(line)["step"] for line in open(f"{out}/metrics.jsonl")] == list(range(1, 7))
    model, cfg, tok = train_vlm.load_vlm(out)
    assert cfg["stage"] == "vlm" and model.image_token_id == tok.special("<|image|>")


def test_vlm_torchrun_two_processes_give_the_loss_curve_of_one_process(tiny_llm_checkpoint, tmp_path):
    common = tiny_vlm_args(tiny_llm_checkpoint, "") + ["--max_steps=3", "--show_captions=0"]
    train_vlm.main(common + [f"--out_dir={tmp_path}/one"])  # one process, grad_accum 2
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_vlm.py"] + common + [f"--out_dir={tmp_path}/two"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = lambda d: [json.loads(line)["loss"] for line in open(f"{tmp_path}/{d}/metrics.jsonl")]
    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-3, (one, two)


def test_vlm_bad_input_is_one_clear_line_and_exit_code_2(tiny_llm_checkpoint, tmp_path, capsys):
    def run(argv):
        with pytest.raises(SystemExit) as e:
            train_llm.run(lambda: train_vlm.main(argv))
        return e.value.code, capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    args = tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "out")
    for argv, msg in [([f"--init={tmp_path}/nope"], "run `python train_llm.py` first"),
                      (["--vision_layer=2"], "unknown option --vision_layer"),
                      (args + [f"--data={tmp_path}/bad.jsonl"], "bad.jsonl:1: not valid JSON"),
                      (args + ["--patch_size=5"], "must be a multiple of patch_size")]:
        code, err = run(argv)
        assert code == 2 and msg in err and err.count("\n") == 1, err


# ---- stage 2 recipe (issue 18)

def test_prompt_film_tower_reads_only_the_words_before_the_answer_and_starts_as_the_plain_tower():
    torch.manual_seed(0)
    llm = M.GPTConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8, mlp_hidden=64, max_seq_len=64)
    vision = M.VisionConfig(image_size=16, patch_size=4, n_layer=1, n_embd=16, n_head=2, head_dim=8, mlp_hidden=32,
                            pixel_shuffle=2, projector_hidden=32, stem="conv", coord_channels=True, film_vocab=64)
    P, A = 60, 61  # <|image|>, <|assistant|>
    vlm = M.VLM(llm, vision, P, prompt_end_id=A).eval()
    n = vlm.n_visual_tokens
    images = torch.rand(2, 1, 3, 16, 16)
    row = lambda q, a: [1, 2] + [P] * n + q + [A] + a
    same_q = torch.tensor([row([5, 6], [7, 8]), row([5, 6], [9, 10])])  # the answers differ
    other_q = torch.tensor([row([5, 6], [7, 8]), row([11, 6], [7, 8])])
    is_image = same_q == P
    x0 = vlm.embed(same_q, images)[is_image]
    torch.testing.assert_close(x0, vlm.embed(other_q, images)[is_image])  # a zero table: no conditioning yet
    with torch.no_grad():
        vlm.vision.film.weight.normal_()
    x1 = vlm.embed(same_q, images)[is_image].view(2, n, -1)
    torch.testing.assert_close(x1[1], vlm.embed(same_q[:1], images[1:])[0, is_image[0]])  # answer words unread
    x2 = vlm.embed(other_q, images)[is_image].view(2, n, -1)
    torch.testing.assert_close(x2[0], x1[0])
    assert not torch.allclose(x2[1], x1[1])  # another question word: another view of the same image
    with pytest.raises(ValueError, match="needs prompt_end_id"):
        M.VLM(llm, vision, P)
    assert vlm.estimate_flops(20) > 20 * vlm.llm.estimate_flops(20)


def test_cell_colour_targets_name_the_rendered_objects_in_their_cells():
    from eval_sim import COLOURS, vlm_sample
    names, rgb = train_vlm.world_colours()
    image, caption, _ = vlm_sample(5, 64, "train")
    cells = train_vlm.cell_colour_targets(data.preprocess_image(image, 64)[None, None], 4, list(range(7)), rgb)
    assert cells.shape == (1, 16)
    named = {names[c] for c in cells[0].tolist() if c < 6}
    assert named == {c for c in COLOURS if f"{c} " in caption}  # every object and bowl, nothing else
    assert (cells == 6).sum() >= 8  # most cells show only the table


def test_caption_scores_are_object_level_precision_and_recall():
    truth = ["the red block is at the top. the blue bowl is on the left side."]
    assert train_vlm.caption_objects(truth[0]) == {("red", "block"), ("blue", "bowl")}
    assert train_vlm.caption_scores(["the red block and the green disc."], truth) == (0.5, 0.5)
    assert train_vlm.caption_scores(["a table."], truth) == (0.0, 0.0)


def test_world_captions_come_in_whole_micro_batches():
    kinds = [train_vlm.world_example(i, "train", 16, turns=1, caption_block=4, caption_every=3)["turns"]
             for i in range(12)]
    is_caption = [t[0][0] == data.CAPTION_PROMPT for t in kinds]
    assert is_caption == [True] * 4 + [False] * 8
    assert all(len(t) == 1 for t in kinds)


def test_vlm_probe_trains_each_seed_and_prints_accuracy_with_and_without_images(tiny_llm_checkpoint, tmp_path, capsys):
    args = tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "probe") + [
        "--max_steps=2", "--probe", "--probe_seeds=1,2", "--vision_stem=conv", "--coord_channels", "--film",
        "--world_turns=1", "--cell_words=0.5"]
    rows = train_vlm.main(args)
    assert [r["seed"] for r in rows] == [1, 2] and not os.path.exists(tmp_path / "probe" / "latest")
    out = capsys.readouterr().out
    assert "blanked" in out and "captions P/R" in out and "left/above" in out
