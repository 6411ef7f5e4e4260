"""nanofoundry test suite: fast on a 2-core CPU (python -m pytest test_all.py)."""
import functools
import json
import math
import os
import random
import re
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


@pytest.mark.parametrize("case", ["causal", "causal_short_query", "bidirectional", "batch_mask"])
def test_explicit_attention_matches_sdpa(case):
    """The CPU bf16 path (model.explicit_attention) computes what SDPA does: GQA, the top-left causal triangle, masks."""
    torch.manual_seed(0)
    L = 3 if case == "causal_short_query" else 7
    q, k, v = torch.randn(2, 4, L, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = (torch.rand(2, 1, L, 7) > 0.3) | torch.eye(L, 7, dtype=torch.bool) if case == "batch_mask" else None
    causal = case.startswith("causal")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(M.explicit_attention(q, k, v, mask, causal), want, atol=1e-5, rtol=1e-5)
    got_bf16 = M.explicit_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, causal)
    assert got_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf16.float(), want, atol=3e-2, rtol=3e-2)


def test_attention_uses_the_explicit_product_only_on_cpu_in_bf16_up_to_512_keys(monkeypatch):
    calls, explicit = [], M.explicit_attention
    monkeypatch.setattr(M, "explicit_attention", lambda *args: calls.append(1) or explicit(*args))
    attn = M.Attention(n_embd=32, n_head=4, n_kv_head=2, head_dim=8, qk_norm=True, eps=1e-6)
    for T, dtype, used in ((7, torch.float32, False), (7, torch.bfloat16, True), (513, torch.bfloat16, False)):
        calls.clear()
        attn.to(dtype)(torch.randn(1, T, 32, dtype=dtype), M.rope_table(T, 8, 10000.0), causal=True)
        assert bool(calls) == used, (T, dtype)


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
        out_dir = [] if any(a.startswith("--out_dir") for a in argv) else [f"--out_dir={tmp_path}/o"]
        code, err = run_cli_in_process(argv + out_dir + [f"--data_dir={tmp_path}/d"], capsys)
        assert code == 2 and msg in err and err.count("\n") == 1, err
    # a corrupt shard in the cache: the loader names it
    out = tmp_path / "run"
    train_llm.main(TINY + [f"--out_dir={out}", "--max_steps=1"])
    shard = out / "data" / "train_000.bin"
    shard.write_bytes(b"garbage" * 300)
    code, err = run_cli_in_process(TINY + [f"--out_dir={out}", "--max_steps=1", "--overwrite"], capsys)
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
    train_llm.load_plain(os.path.join(path, "optimizer.pt"))
    assert train_llm.load_plain(os.path.join(path, "state.pt"))["step"] >= 1


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


def test_balance_in_bowl_asks_more_often_about_an_object_in_a_bowl_in_training_scenes_only():
    def in_bowl_answers(split, balance):
        return [a for i in range(200) for q, a in eval_sim.vlm_sample(i, 16, split, balance_in_bowl=balance)[2]
                if eval_sim.question_type(q) == "in bowl"]
    plain, balanced = in_bowl_answers("train", False), in_bowl_answers("train", True)
    assert balanced.count("yes") >= 1.5 * plain.count("yes") > 0 and len(balanced) == len(plain)
    assert train_vlm.parse_config(train_vlm.TrainConfig, ["--balance_in_bowl"]).balance_in_bowl
    scene = 1  # a question scene (index % caption_every != 0): train_vlm hands the option on to the world
    assert train_vlm.world_example(scene, "train", 16, balance_in_bowl=True)["turns"] == \
        eval_sim.vlm_sample(scene, 16, "train", balance_in_bowl=True)[2]


def test_hold_more_rolls_training_scenes_on_until_something_is_held():
    def held(hold_more):
        return sum(a != "nothing" for i in range(200) for q, a in eval_sim.vlm_sample(i, 16, "train", hold_more=hold_more)[2]
                   if eval_sim.question_type(q) == "holding")
    assert held(True) >= 1.3 * held(False) > 0
    assert train_vlm.world_example(1, "train", 16, hold_more=True)["turns"] == \
        eval_sim.vlm_sample(1, 16, "train", hold_more=True)[2]


def test_captions_and_questions_are_grounded_and_answers_are_short():
    image, caption, qa, _ = eval_sim.vlm_sample(3, image_size=32)
    assert image.shape == (32, 32, 3) and qa
    env = eval_sim.TabletopEnv("stack", image_size=32)
    env.reset(seed=2)
    caption = eval_sim.describe_scene(env)
    for o in env.scene.objs:
        assert o.name in caption
    in_colour_order = eval_sim.describe_scene(env, colour_order=True)  # the same sentences, objects sorted by colour
    assert sorted(in_colour_order.split(". ")[1:-2]) == sorted(caption.split(". ")[1:-2])
    named = [eval_sim.COLOUR_NAMES.index(c) for c, kind in re.findall(r"the (\w+) (block|disc)\b", in_colour_order)]
    first_mention = list(dict.fromkeys(named))
    assert first_mention == sorted(first_mention) and len(first_mention) == len(env.scene.movables())
    bowls = eval_sim.TabletopEnv("multi_place", image_size=32)
    bowls.reset(seed=2)  # a bowl and four objects: one list by colour puts the red bowl first; the relation is
    one_list = eval_sim.describe_scene(bowls, colour_order=True, one_list=True)  # between the list's first two
    named = re.findall(r"the (\w+) (?:block|disc|bowl)", one_list)
    things = list(dict.fromkeys(eval_sim.COLOUR_NAMES.index(c) for c in named))  # in order of first mention
    assert things == sorted(things) and len(things) == len(bowls.scene.objs) and "the red bowl is" in one_list
    assert "the red bowl is left of the green block." in one_list
    objects_then_bowls = eval_sim.describe_scene(bowls, colour_order=True)  # the same sentence for each thing
    assert sorted(one_list.split(". ")[1:-2]) == sorted(objects_then_bowls.split(". ")[1:-2])
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
    # seeds of one recipe pool: successes and episodes add per task and split
    pooled = eval_sim.pool_results([a, b, _fake_results({"reach": 5}, 50)])
    assert list(pooled["tasks"]) == ["reach"] and pooled["tasks"]["reach"]["all"]["successes"] == 90
    assert pooled["overall"]["seen"]["n"] == 250 and pooled["overall"]["all"]["successes"] == 40 + 10 + 45 + 10 + 5
    (tmp_path / "b.json").write_text(json.dumps(b))
    proc = subprocess.run([sys.executable, "eval_sim.py", "compare", f"{tmp_path}/a.json,{tmp_path}/b.json",
                           str(tmp_path / "b.json")], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0 and "105/200" in proc.stdout and "55/100" in proc.stdout
    with pytest.raises(data.UserError, match="on each side"):
        eval_sim.main(["compare", ",", str(tmp_path / "b.json")])


def test_bad_inputs_give_clear_user_errors(tmp_path):
    (tmp_path / "bad.json").write_text('{"tasks": 3}')
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(data.UserError, match="not an eval_sim results file"):
        eval_sim.load_results(str(tmp_path / "bad.json"))
    with pytest.raises(data.UserError, match="not valid JSON"):
        eval_sim.load_results(str(tmp_path / "broken.json"))
    with pytest.raises(data.UserError, match="is not a checkpoint"):
        eval_sim.make_policy(str(tmp_path))
    (tmp_path / "config.json").write_text('{"n_layer": 2}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(data.UserError, match="has no action expert|not a checkpoint"):
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


def test_keypoint_words_let_a_word_of_its_own_choose_what_a_keypoint_reads(vla_world):
    torch.manual_seed(0)
    vla = tiny_vla(vla_world.tokenizer, **KEYPOINTS_ACTIONS, keypoint_words=True).eval()
    expert, enc = vla.action_expert, vla_world.tokenizer.encode
    assert not hasattr(tiny_vla(vla_world.tokenizer, **KEYPOINTS_ACTIONS).action_expert, "keypoint_word_weight")
    assert expert.keypoint_word_weight.weight.abs().sum() == 0  # starts as the hidden states alone
    batch = fake_batch(vla_world.tokenizer, vla, B=2)
    with torch.no_grad():
        expert.keypoint_query_pool.weight.zero_()
        expert.keypoint_query_pool.bias.zero_()
        expert.keypoint_word_weight.weight[enc(" red")[0]] = 3.0  # x10 in the logits: all weight on " red"
        base = vla.encode_prefix(batch["idx"], batch["images"], batch["prefix_mask"])["keypoints"]
        row = batch["idx"][0]
        red = (row == enc(" red")[0]).nonzero()[0, 0]
        other = [t for t in range(len(row)) if batch["prefix_mask"][0, t] and row[t] not in
                 (enc(" red")[0], vla.vlm.image_token_id)][0]
        idx = batch["idx"].clone()
        idx[0, other] = enc(" green")[0]  # another word, unweighted: nothing moves
        assert torch.allclose(base, vla.encode_prefix(idx, batch["images"], batch["prefix_mask"])["keypoints"], atol=1e-5)
        idx = batch["idx"].clone()
        idx[0, red] = enc(" green")[0]  # the weighted word gone: the query is the mean of the rest, row 0 moves
        moved = vla.encode_prefix(idx, batch["images"], batch["prefix_mask"])["keypoints"]
        assert not torch.allclose(base[0], moved[0], atol=1e-4) and torch.allclose(base[1], moved[1])


def test_keypoint_pool_aims_stage_3_keypoints_over_the_patches_averaged_in_blocks(vla_world):
    torch.manual_seed(0)
    fine = M.ActionExpert(M.ExpertConfig(keypoints=3, patch_grid=4, patch_dim=8, n_images=2, keypoint_pool=2))
    coarse = M.ActionExpert(M.ExpertConfig(keypoints=3, patch_grid=2, patch_dim=8, n_images=2))
    coarse.load_state_dict(fine.state_dict())  # the pool adds no weights
    patches = torch.randn(5, 2 * 16, 8)  # two images of 4 x 4 patches, row-major
    # by hand: each 2 x 2 block of an image's grid averaged, then the 2 x 2 grid's keypoints
    blocks = patches.view(5, 2, 2, 2, 2, 2, 8).mean((3, 5)).reshape(5, 2 * 4, 8)
    with torch.no_grad():
        assert torch.allclose(fine.keypoint_features(patches), coarse.keypoint_features(blocks), atol=1e-6)
    vlm = tiny_vlm(vla_world.tokenizer)  # a 2 x 2 patch grid: a pool of 3 does not divide it
    with pytest.raises(ValueError, match="keypoint_pool 3 must divide"):
        M.VLA(vlm, M.ExpertConfig(keypoints=3, patch_grid=2, patch_dim=vlm.vision_config.n_embd, keypoint_pool=3,
                                  n_layer=vlm.config.n_layer, n_kv_head=vlm.config.n_kv_head, head_dim=vlm.config.head_dim))


def test_answer_points_hand_the_expert_where_the_vlms_answer_keypoints_point_in_each_image(vla_world):
    torch.manual_seed(0)
    tok = vla_world.tokenizer
    vocab = train_llm.round_up(tok.n_vocab, 64)
    llm = M.GPTConfig(vocab_size=vocab, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, head_dim=16, mlp_hidden=64,
                      max_seq_len=128)
    vision = M.VisionConfig(image_size=16, patch_size=4, n_layer=1, n_embd=16, n_head=2, head_dim=8, mlp_hidden=32,
                            pixel_shuffle=2, projector_hidden=32, answer_keypoints=2, answer_vocab=vocab)
    vlm = M.VLM(llm, vision, tok.special("<|image|>"), prompt_end_id=tok.special("<|assistant|>"),
                prompt_start_id=tok.special("<|user|>"))
    expert = dict(n_layer=2, n_embd=24, mlp_hidden=48, n_head=2, n_kv_head=1, head_dim=16, chunk_size=4, n_images=2,
                  vlm_n_embd=32, vocab_size=vocab)
    vla = M.VLA(vlm, M.ExpertConfig(answer_points=2, **expert))
    with torch.no_grad():  # sharp, so places and cameras mixed up would show (at init they are near uniform)
        vlm.projector.answer_keypoints.sharpness.fill_(4.0)
    batch = fake_batch(tok, vla)
    prefix = vla.encode_prefix(batch["idx"], batch["images"], batch["prefix_mask"])
    # by hand: the softmax at each row's <|assistant|> over both images' 4 x 4 patches, split by image
    weights = vlm.llm_inputs(batch["idx"], batch["images"])["keypoints"]["patches"][:, 0]  # (B, 2 * 16, 2)
    want = []
    for row in weights:
        for image in range(2):
            for k in range(2):
                w = row[image * 16:(image + 1) * 16, k]
                col, line = torch.arange(16) % 4 / 3 * 2 - 1, torch.arange(16) // 4 / 3 * 2 - 1
                want += [(w * col).sum() / w.sum(), (w * line).sum() / w.sum(), w.sum()]
    assert torch.allclose(prefix["answer_points"], torch.stack(want).view(3, 12), atol=1e-5)
    loss = vla(**batch, noise=torch.randn(3, 4, 3), t=M.sample_flow_time(3))
    loss.backward()  # the expert reads them, and its loss reaches the VLM's word tables that aim them
    assert vla.action_expert.answer_points_in.weight.grad.abs().sum() > 0
    assert vlm.projector.answer_keypoints.query.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="answer_points 3 must equal the VLM's answer keypoints"):
        M.VLA(vlm, M.ExpertConfig(answer_points=3, **expert))


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
    a = train_vla.VLAPolicy(vla, vla_world.tokenizer, settings, norm, seed=7).act(obs)
    b = train_vla.VLAPolicy(vla, vla_world.tokenizer, settings, norm, seed=7).act(obs)
    c = train_vla.VLAPolicy(vla, vla_world.tokenizer, settings, norm, seed=8).act(obs)
    assert a.shape == (2, 2, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    lo, hi = norm["action"]["stats"]["min"], norm["action"]["stats"]["max"]
    assert (a >= np.array(lo) - 1e-6).all() and (a <= np.array(hi) + 1e-6).all()  # clamped to the demos' range
    # bad observations: one line naming what was expected
    policy = train_vla.VLAPolicy(vla, vla_world.tokenizer, settings, norm)
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
    r2, r2_paraphrased = train_vla.probe_keypoints(train_vla.parse_config(train_vla.TrainConfig, [f"--out_dir={out}"]),
                                                   scenes_per_task=2)
    assert r2.shape == r2_paraphrased.shape == (3,) and np.all(r2 <= 1) and np.all(r2_paraphrased <= 1)
    assert not np.allclose(r2, r2_paraphrased)  # language keypoints: other words, other points


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
    policy = train_vla.load_policy(out)  # the run directory: its latest checkpoint, EMA weights
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
    idx, targets, images, labels = loader.next_batch()
    assert labels is None  # the example has no "labels"
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
    # with targets only the answer positions reach the vocabulary: the same logits, loss and gradients as
    # projecting every position and ignoring the rest
    loss.backward()
    sparse_grad = vlm.llm.embed_tokens.weight.grad.clone()
    vlm.zero_grad()
    full = vlm(idx, images)[0]
    assert torch.allclose(logits, full[0, keep], atol=1e-6)
    F.cross_entropy(full.flatten(0, 1), targets.flatten(), ignore_index=-1).backward()
    assert torch.allclose(loss, F.cross_entropy(full[0, keep], targets[0, keep]))
    assert torch.allclose(sparse_grad, vlm.llm.embed_tokens.weight.grad, atol=1e-6)
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
    idx, targets, images, _ = loader.next_batch()
    assert images.shape == (5, 1, 3, 16, 16) and loader.skipped == 1
    longest = max((t >= 0).nonzero().max().item() for t in targets) + 1  # the last target is the row's end
    assert idx.shape[1] == min(-(-longest // 32) * 32, 64)  # padded to a multiple of 32 (the default), within seq_len
    idx8, targets8, *_ = make(skip_bad=True, pad_multiple=8).next_batch()  # the same rows, less padding
    assert idx8.shape[1] == -(-longest // 8) * 8 < idx.shape[1] and torch.equal(idx8, idx[:, :idx8.shape[1]])
    assert torch.equal(targets8, targets[:, :idx8.shape[1]]) and (targets[:, idx8.shape[1]:] == -1).all()
    with pytest.raises(data.UserError, match=r"d2.jsonl:1: expected a string 'text'"):
        (tmp_path / "d2.jsonl").write_text('{"image": "a.png", "conversations": [{"from": "gpt"}]}\n')
        data.read_image_text_jsonl(str(tmp_path / "d2.jsonl"))


@pytest.fixture(scope="module")
def tiny_llm_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm") / "llm"
    train_llm.main(TINY + ["--seq_len=64", "--batch_tokens=256", f"--out_dir={out}", "--max_steps=1"])
    return str(out)


def tiny_vlm_args(init, out):
    return [f"--init={init}", f"--out_dir={out}", "--image_size=16", "--patch_size=4", "--pixel_shuffle=2",
            "--vision_layers=1", "--vision_embd=16", "--vision_heads=2", "--vision_head_dim=8", "--vision_mlp_hidden=32",
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


def test_bench_times_a_stage2_step_both_loss_paths_and_both_adamw_kernels(tiny_llm_checkpoint, tmp_path, monkeypatch,
                                                                          capsys):
    import bench
    out = str(tmp_path / "vlm")
    train_vlm.main(tiny_vlm_args(tiny_llm_checkpoint, out) + ["--max_steps=1"])
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["bench.py", f"--vlm={out}", "--micro_batch=2", "--warmup=1", "--steps=1",
                                     "--compile=False"])
    bench.main()
    printed = capsys.readouterr().out
    assert re.search(r"LM loss at answer positions \d+ ms, every position \d+ ms", printed), printed
    assert re.search(r"AdamW fused [\d.]+ ms, AdamW per-tensor [\d.]+ ms", printed), printed


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
    for argv, msg in [([f"--init={tmp_path}/nope", f"--out_dir={tmp_path}/o"], "run `python train_llm.py` first"),
                      (["--vision_layer=2"], "unknown option --vision_layer"),
                      (args + [f"--data={tmp_path}/bad.jsonl"], "bad.jsonl:1: not valid JSON"),
                      (args + ["--patch_size=5"], "must be a multiple of patch_size"),
                      (args + ["--image_size=24", "--patch_size=6"], "--patch_size=6 must be a power of 2")]:
        code, err = run(argv)
        assert code == 2 and msg in err and err.count("\n") == 1, err


# ---- figures (issue 15)

def test_figures_draw_a_rollout_row_per_task_from_any_act_policy(tmp_path):
    import figures
    rows = figures.rollout_rows(eval_sim.ExpertPolicy(noise=0.0), 32, n_frames=3, display_size=24)
    assert len(rows) == len(eval_sim.TASKS) and all(r.dtype == np.uint8 and r.shape[2] == 3 for r in rows)
    out = tmp_path / "world.png"
    figures.main(["world", "--out", str(out)])
    assert out.stat().st_size > 1000


# ---- bad input (issue 20)
import shutil  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

# Each case is its own process: a fork of one interpreter that imported torch and the four CLIs
# once, running the script as __main__ with the case's argv (a fresh `python script.py` spends
# ~2.5 s of CPU importing torch here; 50 of them would cost a minute on two cores). A few real
# `python script.py` runs beside the table check that the fork is what a user gets.
FORK_RUNNER = """
import json, os, runpy, sys, traceback
import torch, train_llm, train_vlm, train_vla, eval_sim
torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())  # its first use imports ~1 s of torch: once, here
cases, running, codes = json.load(sys.stdin), {}, {}
def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
for i, (script, argv, err_file) in enumerate(cases):
    if len(running) >= 4:
        reap()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(err_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv, code = [script] + argv, 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    running[pid] = i
while running:
    reap()
print(json.dumps([codes[i] for i in range(len(cases))]))
"""


def run_cli_cases(cases, tmp):
    """[(script, argv)] -> [(exit code, stderr)], each case a forked process (FORK_RUNNER)."""
    errs = [str(tmp / f"stderr_{i}.txt") for i in range(len(cases))]
    proc = subprocess.run([sys.executable, "-c", FORK_RUNNER], input=json.dumps(
        [(s, [str(a) for a in argv], e) for (s, argv), e in zip(cases, errs)]), cwd=ROOT, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return [(code, open(e).read()) for code, e in zip(results, errs)]


def run_real_cli(script, argv):
    proc = subprocess.run([sys.executable, script] + [str(a) for a in argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stderr


def tree_state(root):
    """{path: bytes} of every file under root, and the set of its directories."""
    files, dirs = {}, set()
    for d, subdirs, names in os.walk(root):
        dirs.add(d)
        for n in names:
            files[os.path.join(d, n)] = open(os.path.join(d, n), "rb").read()
    return files, dirs


class Payload:
    """A pickle that creates a marker file when unpickled: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path, marker):
    if path.endswith(".pt"):
        torch.save({"step": Payload(marker)}, path)
    else:
        import pickle
        open(path, "wb").write(pickle.dumps(Payload(marker)))


def edit_npz(path, **arrays):
    with np.load(path) as z:
        content = dict(z)
    content.update(arrays)
    np.savez_compressed(path, **content)


@pytest.fixture(scope="module")
def vla_run(vla_world, tmp_path_factory):
    """A trained (2-step) stage-3 run directory: an eval_sim policy and a resumable checkpoint."""
    out = str(tmp_path_factory.mktemp("vla_run") / "run")
    train_vla.main(vla_args(vla_world, out, "--max_steps=2", "--val_every=0"))
    return out


def llm_resume_args(out):
    return TINY + ["--seq_len=64", "--batch_tokens=256", f"--out_dir={out}", "--max_steps=2", "--resume"]


def test_bad_input_table_exits_2_with_one_line_no_traceback_and_changes_nothing(
        tiny_llm_checkpoint, vla_world, vla_run, tmp_path):
    """One table of bad inputs across the four CLIs: flags, text data, shards, images, episodes,
    checkpoints, results files. Every case: exit code 2, <= 2 lines on stderr, no traceback, the
    expected words, and no file changed (or added) in any directory that existed before."""
    old, new = tmp_path / "old", tmp_path / "new"  # inputs and existing outputs | fresh outputs
    old.mkdir()
    new.mkdir()
    marker = str(tmp_path / "marker")
    llm = str(old / "llm")
    shutil.copytree(tiny_llm_checkpoint, llm)
    ckpt = train_llm.find_checkpoint(llm)

    def llm_copy(name, file, content=None, payload=False, edit=None):
        """A copy of the stage-1 run with one file of its latest checkpoint replaced."""
        d = str(old / name)
        shutil.copytree(llm, d)
        path = os.path.join(d if file.startswith("data/") else train_llm.find_checkpoint(d), file)
        if payload:
            write_payload(path, marker)
        elif edit:
            edit(path)
        else:
            open(path, "wb").write(content)
        return d

    weights = open(f"{ckpt}/model.safetensors", "rb").read()
    state_pickle = llm_copy("llm_state", "state.pt", payload=True)
    optim_pickle = llm_copy("llm_optim", "optimizer.pt", payload=True)
    weights_pickle = llm_copy("llm_weights", "model.safetensors", payload=True)
    weights_cut = llm_copy("llm_cut", "model.safetensors", weights[:len(weights) // 2])
    config_bad = llm_copy("llm_config", "config.json", b"{not json")
    wider = llm_copy("llm_wider", "config.json", edit=lambda p: json.dump(
        json.load(open(p)) | {"model": json.load(open(p))["model"] | {"n_embd": 96}}, open(p, "w")))
    shard_bad = llm_copy("llm_shard", "data/train_000.bin", b"garbage" * 300)
    shard_cut = llm_copy("llm_shard_cut", "data/train_000.bin",
                         open(f"{llm}/data/train_000.bin", "rb").read()[:2000])
    (old / "empty.txt").write_text("")
    (old / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": 3}\n')
    (old / "notes.csv").write_text("a,b\n")
    # stage-2 data: a corrupt image, a missing one
    (old / "broken.png").write_bytes(b"\x89PNG not really")
    (old / "pairs.jsonl").write_text('{"image": "broken.png", "text": "a red block"}\n' * 4)
    (old / "missing.jsonl").write_text('{"image": "nope.png", "text": "a red block"}\n' * 4)
    # episodes: copies of the demo set with one thing wrong
    def demos_copy(name, edit):
        d = str(old / name)
        shutil.copytree(vla_world.demos, d)
        edit(d)
        return d
    ep0 = "episodes/episode_000000.npz"
    nan_action = demos_copy("demos_nan", lambda d: edit_npz(f"{d}/{ep0}", action=np.full((
        len(np.load(f"{d}/{ep0}")["action"]), 3), np.nan, np.float32)))
    wide_action = demos_copy("demos_wide", lambda d: edit_npz(f"{d}/{ep0}", action=np.zeros((
        len(np.load(f"{d}/{ep0}")["action"]), 4), np.float32)))
    big_images = demos_copy("demos_images", lambda d: edit_npz(f"{d}/{ep0}", images_scene=np.zeros((
        len(np.load(f"{d}/{ep0}")["action"]), 20, 20, 3), np.uint8)))
    cut_episode = demos_copy("demos_cut", lambda d: open(f"{d}/{ep0}", "r+b").truncate(100))
    bad_meta = demos_copy("demos_meta", lambda d: open(f"{d}/meta.json", "w").write("[1, 2"))
    bad_stats = demos_copy("demos_stats", lambda d: json.dump(
        json.load(open(f"{d}/stats.json")) | {"action": {k: [0.0] * 2 for k in ("mean", "std", "min", "max", "q01", "q99")}},
        open(f"{d}/stats.json", "w")))
    # stage-2 checkpoint whose weights are a pickle; stage-3 runs with one file broken
    vlm_pickle = str(old / "vlm_pickle")
    shutil.copytree(vla_world.vlm, vlm_pickle)
    write_payload(os.path.join(train_llm.find_checkpoint(vlm_pickle), "model.safetensors"), marker)

    def vla_copy(name, file, content=None, payload=False):
        d = str(old / name)
        shutil.copytree(vla_run, d)
        path = os.path.join(train_llm.find_checkpoint(d), file)
        write_payload(path, marker) if payload else open(path, "wb").write(content)
        return d
    vla_weights = open(os.path.join(train_llm.find_checkpoint(vla_run), "model.safetensors"), "rb").read()
    vla_state_pickle = vla_copy("vla_state", "state.pt", payload=True)
    vla_cut = vla_copy("vla_cut", "model.safetensors", vla_weights[:len(vla_weights) - 64])
    vla_config = vla_copy("vla_config", "config.json", b"\x00\x01")
    (old / "results_bad.json").write_text('{"tasks": {}, "overall": {"all": {"successes": 5, "n": 3}}}')
    (old / "results_broken.json").write_text("{")
    good = {"tasks": {"reach": {"all": {"successes": 1, "n": 2}}}, "overall": {"all": {"successes": 1, "n": 2}}}
    (old / "results_good.json").write_text(json.dumps(good))

    o = lambda i: f"--out_dir={new}/{i}"  # a fresh output directory per case
    L, V, A, E = "train_llm.py", "train_vlm.py", "train_vla.py", "eval_sim.py"
    vlm = lambda i, *x: (V, tiny_vlm_args(llm, f"{new}/{i}") + list(x))
    vla = lambda i, *x: (A, vla_args(vla_world, f"{new}/{i}") + list(x))
    ev = lambda policy, *x: (E, ["eval", f"--policy={policy}", "--episodes_per_task=1", "--tasks=reach",
                                 "--splits=seen", "--image_size=16", f"--out={new}/eval"] + list(x))
    table = [  # (category, (script, argv), words the error must contain)
        ("flag", (L, TINY + [o(1), "--max_steps=-1"]), "--max_steps=-1 is out of range"),
        ("flag", (L, TINY + [o(2), "--micro_batch=0"]), "--micro_batch=0 is out of range"),
        ("flag", (L, TINY + [o(3), "--batch_tokens=100"]), "must be a multiple of micro_batch * seq_len"),
        ("flag", (L, TINY + [o(4), "--lr=nan"]), "--lr expects a finite float"),
        ("flag", (L, TINY + [o(5), "--n_head=4", "--n_kv_head=3"]), "must be a multiple of --n_kv_head=3"),
        ("flag", (L, TINY + [o(6), "--beta2=1.0"]), "--beta2=1.0"),
        ("flag", (L, TINY + [o(7), "--schedule=linear"]), "--schedule=linear"),
        ("flag", (L, TINY + [o(8), "--resume", "--overwrite"]), "pass one"),
        ("flag", (L, TINY + [o(9), "--vocab_size=100"]), "--vocab_size=100 is out of range"),
        ("text data", (L, TINY + [o(10), f"--data={old}/missing.txt"]), "data file not found"),
        ("text data", (L, TINY + [o(11), f"--data={old}/empty.txt"]), "data file is empty"),
        ("text data", (L, TINY + [o(12), f"--data={old}/bad.jsonl"]), "bad.jsonl:2: expected a JSON object"),
        ("text data", (L, TINY + [o(13), f"--data={old}/notes.csv"]), "expected .txt or .jsonl"),
        ("shard", (L, TINY + ["--seq_len=64", o(14), f"--data_dir={shard_bad}/data"]), "is not a token shard"),
        ("shard", (L, TINY + ["--seq_len=64", o(15), f"--data_dir={shard_cut}/data"]), "truncated or corrupt"),
        ("checkpoint", (L, TINY + ["--seq_len=64", f"--out_dir={llm}"]), "already holds checkpoints"),
        ("checkpoint", (L, llm_resume_args(state_pickle)), "state.pt is refused"),
        ("checkpoint", (L, llm_resume_args(optim_pickle)), "optimizer.pt is refused"),
        ("checkpoint", (L, llm_resume_args(weights_pickle)), "is not a readable safetensors file"),
        ("checkpoint", (L, llm_resume_args(weights_cut)), "is not a readable safetensors file"),
        ("checkpoint", (L, llm_resume_args(config_bad)), "config.json is not valid JSON"),
        ("checkpoint", (L, llm_resume_args(llm) + ["--n_embd=96"]), "cannot resume: the configured model differs"),
        ("flag", vlm(20, "--patch_size=5"), "must be a multiple of patch_size"),
        ("flag", vlm(21, "--batch_size=5"), "--batch_size=5 must be a multiple of micro_batch"),
        ("flag", vlm(22, "--world_val=0"), "--world_val=0 is out of range"),
        ("flag", vlm(23, "--vision_lr=-1"), "--vision_lr=-1.0 is out of range"),
        ("checkpoint", vlm(24, f"--init={weights_cut}"), "is not a readable safetensors file"),
        ("checkpoint", vlm(25, f"--init={wider}"), "expects [320, 96]"),
        ("checkpoint", vlm(26, f"--init={weights_pickle}"), "is not a readable safetensors file"),
        ("checkpoint", vlm(27, f"--init={vla_world.vlm}"), "stage 2 starts from a stage-1"),
        ("image", vlm(28, f"--data={old}/pairs.jsonl"), "cannot read image"),
        ("image", vlm(29, f"--data={old}/missing.jsonl"), "nope.png"),
        ("flag", vla(30, "--execute_steps=9"), "--execute_steps=9 must be between 1 and --chunk_size=4"),
        ("flag", vla(31, "--ema_decay=1"), "--ema_decay=1.0 must be in [0, 1)"),
        ("flag", vla(32, "--noise_repeats=0"), "--noise_repeats=0 is out of range"),
        ("flag", vla(33, "--batch_size=3"), "--batch_size=3 must be a multiple of micro_batch"),
        ("flag", vla(34, "--cameras=scene,scene"), "--cameras=scene,scene"),
        ("flag", vla(42, "--keypoint_pool=3"), "--keypoint_pool=3 must divide the VLM's 2 x 2 patch grid"),
        ("episodes", vla(35, f"--demos={nan_action}"), "episode_000000.npz: action holds NaN/Inf"),
        ("episodes", vla(36, f"--demos={wide_action}"), "action has shape"),
        ("episodes", vla(37, f"--demos={big_images}"), "meta.json image_size [16, 16]"),
        ("episodes", vla(38, f"--demos={cut_episode}"), "is unreadable"),
        ("episodes", vla(39, f"--demos={bad_meta}"), "meta.json is not a valid"),
        ("episodes", vla(40, f"--demos={bad_stats}"), "stats.json: action.mean should list 3 values"),
        ("checkpoint", vla(41, f"--init={vlm_pickle}"), "is not a readable safetensors file"),
        ("checkpoint", (A, vla_args(vla_world, vla_state_pickle, "--resume")), "state.pt is refused"),
        ("checkpoint", (A, vla_args(vla_world, vla_run)), "already holds checkpoints"),
        ("flag", (E, ["collect", "--episodes_per_task=0", f"--out={new}/demos"]), "expected an integer >= 1"),
        ("flag", (E, ["collect", f"--out={vla_world.demos}"]), "already holds a dataset"),
        ("flag", ev("noop", "--num_envs=0"), "--num_envs: expected an integer >= 1"),
        ("flag", ev("noop", "--splits=train"), "--splits must list seen and/or heldout"),
        ("flag", ev("noop", "--image_size=4"), "--image_size: expected an integer between 8 and 1024"),
        ("flag", (E, ["eval", "--policy=noop", "--episodes_per_task"]), "expected one argument"),
        ("checkpoint", ev(vla_cut), "is not a readable safetensors file"),
        ("checkpoint", ev(vla_config), "is not valid"),
        ("results", (E, ["compare", f"{old}/results_bad.json", f"{old}/results_good.json"]), "not an eval_sim results file"),
        ("results", (E, ["compare", f"{old}/results_broken.json", f"{old}/results_good.json"]), "is not valid JSON"),
        ("results", (E, ["compare", f"{old}/nothing.json", f"{old}/results_good.json"]), "does not exist"),
    ]
    real = [table[i] for i in (22, 32)]  # real `python script.py` runs (stages 1 and eval_sim: tests above)
    watched = [old, os.path.dirname(vla_world.demos), os.path.dirname(vla_run), os.path.dirname(tiny_llm_checkpoint)]
    before = [tree_state(d) for d in watched]
    with ThreadPoolExecutor(len(real) + 1) as pool:
        forked = pool.submit(run_cli_cases, [case for _, case, _ in table], tmp_path)
        real_results = list(pool.map(lambda c: run_real_cli(*c[1]), real))
        results = forked.result()
    failures = []
    for (category, (script, argv), words), (code, err) in list(zip(table, results)) + list(zip(real, real_results)):
        lines = err.strip().splitlines()
        if code != 2 or len(lines) > 2 or "Traceback" in err or words not in err:
            failures.append(f"[{category}] {script} {' '.join(map(str, argv[-2:]))}: exit {code}, stderr {err[-400:]!r}")
    assert not failures, "\n".join(failures)
    for d, (files, dirs) in zip(watched, before):
        files_after, dirs_after = tree_state(d)
        changed = [p for p in files_after.keys() | files.keys() if files.get(p) != files_after.get(p)]
        assert not changed and dirs_after == dirs, (changed, dirs_after ^ dirs)
    assert not os.path.exists(marker)
    assert len(table) >= 30 and {c for c, _, _ in table} == {"flag", "text data", "shard", "image", "episodes",
                                                           "checkpoint", "results"}


def test_a_crafted_pickle_in_any_checkpoint_file_is_refused_without_running(
        tiny_llm_checkpoint, vla_run, tmp_path, capsys):
    """Resume (stage 1), --init (stage 2) and eval_sim's policy loading, each with one checkpoint
    file replaced by a pickle that would create a marker file when unpickled."""
    marker = str(tmp_path / "marker")
    write_payload(str(tmp_path / "live.pt"), marker)
    torch.load(str(tmp_path / "live.pt"), weights_only=False)  # the payload is live: unpickling runs it
    assert os.path.exists(marker)
    os.remove(marker)

    def exit_code(main):
        with pytest.raises(SystemExit) as e:
            train_llm.run(main)
        return e.value.code, capsys.readouterr().err

    cases = [(tiny_llm_checkpoint, f, lambda d: train_llm.main(llm_resume_args(d)))
             for f in ("state.pt", "optimizer.pt", "model.safetensors", "config.json")]
    cases += [(tiny_llm_checkpoint, f, lambda d: train_vlm.main(tiny_vlm_args(d, tmp_path / "vlm_out")))
              for f in ("model.safetensors", "config.json", "tokenizer.json")]
    cases += [(vla_run, f, lambda d: train_vla.load_policy(d))
              for f in ("model.safetensors", "config.json", "tokenizer.json")]
    for i, (run_dir, file, load) in enumerate(cases):
        d = str(tmp_path / f"copy{i}")
        shutil.copytree(run_dir, d)
        write_payload(os.path.join(train_llm.find_checkpoint(d) if file != "config.json" else
                                   os.path.join(d, open(f"{d}/latest").read().strip()), file), marker)
        code, err = exit_code(lambda: load(d))
        assert code == 2 and file in err and err.count("\n") == 1 and not os.path.exists(marker), (file, err)


def test_rng_state_is_tensors_and_plain_values_and_restores_every_generator(tmp_path):
    state = train_llm.rng_state()
    torch.save(state, tmp_path / "state.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    train_llm.set_rng_state(train_llm.load_plain(str(tmp_path / "state.pt")))  # weights_only=True
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_nan_in_demonstrations_is_refused_at_write_and_at_read(tmp_path):
    T, root = 5, str(tmp_path / "demos")
    writer = data.EpisodeWriter(root, ["scene"], 8, ["x", "y"], ["dx", "dy", "grip"], fps=10)
    images, state, action = {"scene": np.zeros((T, 8, 8, 3), np.uint8)}, np.zeros((T, 2)), np.zeros((T, 3))
    bad = action.copy()
    bad[3, 1] = np.nan
    with pytest.raises(data.UserError, match=r"episode 0 \('reach'\): action holds NaN/Inf \(first at step 3"):
        writer.add(images, state, bad, "reach the red block", "reach")
    with pytest.raises(data.UserError, match=r"episode 0 \('reach'\): state holds NaN/Inf"):
        writer.add(images, state + np.inf, action, "reach the red block", "reach")
    writer.add(images, state, action, "reach the red block", "reach")
    writer.close()
    assert len(data.EpisodeDataset(root, cameras=("scene",))) == T
    edit_npz(f"{root}/episodes/episode_000000.npz", state=np.full((T, 2), np.inf, np.float32))
    with pytest.raises(data.UserError, match=r"episode_000000.npz: state holds NaN/Inf"):
        data.EpisodeDataset(root, cameras=("scene",))


def test_nan_mid_training_stops_the_run_and_latest_stays_on_the_last_finite_checkpoint(
        tiny_llm_checkpoint, vla_world, tmp_path, monkeypatch, capsys):
    """Stage 1 with a loss that turns NaN at step 5, stages 2 and 3 with a gradient norm that does
    at step 3: exit 2 with one line naming the step, nothing of that step saved or logged."""
    forward, calls = M.Transformer.forward, []

    def nan_from_step_5(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        calls.append(self.training)
        return logits, loss * float("nan") if loss is not None and calls.count(True) > 8 else loss  # 2 micro-steps
    monkeypatch.setattr(M.Transformer, "forward", nan_from_step_5)
    out = tmp_path / "llm"
    code, err = run_cli_in_process(TINY + [f"--out_dir={out}", "--max_steps=8", "--save_every=2",
                                           "--keep_checkpoints=5"], capsys)
    assert code == 2 and "step 5: loss nan" in err.splitlines()[-1] and "lower --lr" in err
    assert (out / "latest").read_text().strip() == "step_000004" and not (out / "step_000005").exists()
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]
    monkeypatch.undo()

    clip, steps = torch.nn.utils.clip_grad_norm_, []

    def nan_norm_at_step_3(*args, **kwargs):
        steps.append(1)
        norm = clip(*args, **kwargs)
        return norm * float("nan") if len(steps) == 3 else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_norm_at_step_3)
    for stage, out, args in [
            (train_vlm, tmp_path / "vlm", tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "vlm") + ["--save_every=2", "--max_steps=4"]),
            (train_vla, tmp_path / "vla", vla_args(vla_world, tmp_path / "vla", "--val_every=0"))]:
        steps.clear()
        with pytest.raises(data.UserError, match=r"step 3: loss [0-9.]+, grad norm nan: not finite"):
            stage.main(args)
        assert (out / "latest").read_text().strip() == "step_000002" and not (out / "step_000003").exists()
        assert load_tensors(f"{out}/step_000002/model.safetensors")  # the last good one loads


def test_out_dir_with_checkpoints_needs_resume_or_overwrite_and_overwrite_replaces_them(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + [f"--out_dir={out}", "--save_every=1", "--keep_checkpoints=5", "--eval_every=0"]
    train_llm.main(args + ["--max_steps=2"])
    code, err = run_cli_in_process(args + ["--max_steps=1"], capsys)
    assert code == 2 and "already holds checkpoints (latest, step_000001" in err and "--overwrite" in err
    train_llm.main(args + ["--max_steps=1", "--overwrite"])
    assert sorted(os.listdir(out)) == ["data", "latest", "metrics.jsonl", "step_000001"]
    assert len(open(out / "metrics.jsonl").readlines()) == 1


def test_every_numeric_setting_of_the_training_clis_has_a_range_or_a_rule():
    from dataclasses import fields
    for stage in (train_llm, train_vlm, train_vla):
        ruled = " ".join(message for _, message in stage.RULES)
        numeric = [f.name for f in fields(stage.TrainConfig) if type(f.default) in (int, float)]
        unchecked = [n for n in numeric if n not in stage.RANGES and "{" + n + "}" not in ruled]
        assert not unchecked, (stage.__name__, unchecked)


# ---- Hugging Face backbones (issue 16)
# Tiny random models built and saved by transformers itself; our loader (hf.py, no transformers) must
# reproduce their forward pass. transformers and tokenizers are test dependencies only.

import hf  # noqa: E402

HF_TEXT = "Hello  world!! 12345 it's <image> the\tquick\n\n brown   fox's <|endoftext|>3.14 naïve café  x"


def hf_tokenizer(directory, pre="digits"):
    """A byte-level BPE trained by `tokenizers`, saved as directory/tokenizer.json. pre: the
    pre-tokenizer of SmolLM2 ('digits'), GPT-2 ('gpt2') or Qwen (a Split regex, with NFC)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "qwen")
    tok.pre_tokenizer = {"gpt2": byte_level,
                         "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
                         "qwen": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(
                             r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                             r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""), behavior="isolated"), byte_level])}[pre]
    if pre == "qwen":
        tok.normalizer = normalizers.NFC()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<image>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(eval_sim.language_corpus(40) + [HF_TEXT] * 5, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return tok


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """{name: (directory, transformers model)}: Qwen3 tied with GQA 2:1, head_dim 16 != width/heads 8 and
    rope_theta 1e6; Qwen3 untied with GQA 4:1; Llama; a SigLIP tower; a SmolVLM (SigLIP + pixel shuffle + Llama)."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    text = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    built = {
        "qwen3_tied_gqa2": transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **text, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6, tie_word_embeddings=True)),
        "qwen3_untied_gqa4": transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **text, num_attention_heads=4, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **text, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5)),
        "siglip": transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision)),
        "smolvlm": transformers.SmolVLMForConditionalGeneration(transformers.SmolVLMConfig(
            text_config=dict(**text, num_attention_heads=4, num_key_value_heads=2), vision_config=vision,
            scale_factor=2, image_token_id=1)),
    }
    out = {}
    hf_tokenizer(root / "tokenizer")
    for name, m in built.items():
        m.eval().save_pretrained(root / name)
        if name != "siglip":
            import shutil
            shutil.copy(root / "tokenizer" / "tokenizer.json", root / name / "tokenizer.json")
        out[name] = (str(root / name), m)
    return out


def random_pixels(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # ours: [0, 1]; theirs: *2 - 1


@pytest.mark.parametrize("name", ["qwen3_tied_gqa2", "qwen3_untied_gqa4", "llama"])
def test_hf_llm_logits_and_greedy_generation_equal_transformers(hf_models, name):
    directory, theirs = hf_models[name]
    ours, _ = hf.load_llm(directory)
    ours.eval()
    idx = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (theirs(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff <= 1e-4, diff
    expected = theirs.generate(idx[:1], max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert torch.equal(ours.generate(idx[:1], 20, temperature=0), expected)


def test_hf_siglip_tower_features_equal_transformers(hf_models):
    directory, theirs = hf_models["siglip"]
    tower = hf.load_vision(directory).eval()
    px = random_pixels()
    with torch.no_grad():
        diff = (theirs(pixel_values=px * 2 - 1).last_hidden_state - tower(px)).abs().max().item()
    assert diff <= 1e-4, diff


def test_hf_smolvlm_image_features_logits_and_generation_equal_transformers(hf_models):
    directory, theirs = hf_models["smolvlm"]
    vlm, tokenizer = hf.load_vlm(directory)
    vlm.eval()
    assert vlm.n_visual_tokens == 4 and tokenizer.special("<|image|>") == 1  # (32 / 8 / 2)^2; the model's <image>
    px = random_pixels(1)
    prompt = [tokenizer.special("<|endoftext|>"), 2] + [1] * 4 + tokenizer.encode(" put the red block in the bowl")
    idx = torch.tensor([prompt])
    with torch.no_grad():
        patches = theirs.model.vision_model(pixel_values=px * 2 - 1).last_hidden_state
        assert (patches - vlm.vision(px)).abs().max().item() <= 1e-4
        assert (theirs.model.connector(patches) - vlm.projector(patches)).abs().max().item() <= 1e-4
        diff = (theirs(input_ids=idx, pixel_values=px[None] * 2 - 1).logits - vlm(idx, px[None])[0]).abs().max().item()
    assert diff <= 1e-4, diff
    expected = theirs.generate(input_ids=idx, pixel_values=px[None] * 2 - 1, max_new_tokens=20, min_new_tokens=20,
                               do_sample=False)
    assert torch.equal(vlm.generate(idx, px[None], 20, temperature=0), expected)


@pytest.mark.parametrize("pre", ["gpt2", "digits", "qwen"])
def test_hf_tokenizer_ids_equal_the_tokenizers_library_and_survive_our_writer(tmp_path, pre):
    from tokenizers import Tokenizer
    theirs = hf_tokenizer(tmp_path, pre)
    json.dump({"architectures": ["LlamaForCausalLM"]}, open(tmp_path / "config.json", "w"))
    ours = hf.load_tokenizer(str(tmp_path))
    assert ours.encode(HF_TEXT, allow_special=True) == theirs.encode(HF_TEXT).ids
    assert ours.decode(theirs.encode(HF_TEXT).ids) == HF_TEXT
    ours.save(str(tmp_path / "ours.json"))  # our checkpoint format keeps ids, roles and NFC
    assert data.Tokenizer.load(str(tmp_path / "ours.json")).encode(HF_TEXT, True) == theirs.encode(HF_TEXT).ids
    hf.write_tokenizer(ours, str(tmp_path / "written.json"))  # what export writes, read by `tokenizers`
    assert Tokenizer.from_file(str(tmp_path / "written.json")).encode(HF_TEXT).ids == theirs.encode(HF_TEXT).ids


def test_export_round_trip_transformers_logits_equal_ours(tiny_llm_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf.main(["export", tiny_llm_checkpoint, str(tmp_path / "exported")])
    ours, _ = M.load_llm(train_llm.find_checkpoint(tiny_llm_checkpoint))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM"
    idx = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(idx).logits - ours.eval()(idx)[0]).abs().max().item() <= 1e-4
        again, tokenizer = hf.load_llm(str(tmp_path / "exported"))
        assert torch.equal(again.eval()(idx)[0], ours(idx)[0])
    saved = data.Tokenizer.load(os.path.join(train_llm.find_checkpoint(tiny_llm_checkpoint), "tokenizer.json"))
    assert tokenizer.encode("the red block.") == saved.encode("the red block.")


def test_bad_hf_directories_are_one_line_errors_with_exit_code_2(hf_models, vla_world, tmp_path, capsys):
    import shutil
    source = hf_models["smolvlm"][0]

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(source, d)
        edit(d)
        with pytest.raises(SystemExit) as e:
            train_llm.run(lambda: train_vla.main(vla_args(vla_world, tmp_path / "out", f"--init=hf:{d}")))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    def config_edit(**changes):
        def edit(d):
            cfg = json.load(open(d / "config.json"))
            for key, value in changes.items():
                section, _, field = key.rpartition("__")
                (cfg[section] if section else cfg)[field] = value
            json.dump(cfg, open(d / "config.json", "w"))
        return edit

    def shard(d):  # an index naming two shards, one of them gone
        tensors = load_tensors(d / "model.safetensors")
        names = sorted(tensors)
        from safetensors.torch import save_file
        save_file({n: tensors[n] for n in names[:10]}, d / "model-00001-of-00002.safetensors")
        json.dump({"weight_map": {n: f"model-0000{1 + (i >= 10)}-of-00002.safetensors" for i, n in enumerate(names)}},
                  open(d / "model.safetensors.index.json", "w"))
        os.remove(d / "model.safetensors")

    def pickle_only(d):
        torch.save(load_tensors(d / "model.safetensors"), d / "pytorch_model.bin")
        os.remove(d / "model.safetensors")

    def pickle_named_safetensors(d):  # a pickle under the safetensors name (written beside, then renamed over it)
        torch.save({k: v.clone() for k, v in load_tensors(d / "model.safetensors").items()}, d / "pickle.pt")
        os.replace(d / "pickle.pt", d / "model.safetensors")

    assert "architecture GPT2LMHeadModel is not supported" in broken("arch", config_edit(architectures=["GPT2LMHeadModel"]))
    assert "model-00002-of-00002.safetensors, which is missing" in broken("shard", shard)
    assert "has shape (32, 64), config.json implies (32, 48)" in broken("shape", config_edit(text_config__intermediate_size=48))
    assert "pytorch_model.bin is a pickle; expected model.safetensors" in broken("pickle", pickle_only)
    assert "model.safetensors is not a safetensors file" in broken("fake", pickle_named_safetensors)
    assert "rope scaling llama3 is not supported" in broken("rope", config_edit(text_config__rope_scaling={
        "rope_type": "llama3", "factor": 8.0}))
    assert "stage 3 needs a vision-language model" in broken("llm", lambda d: [
        shutil.rmtree(d), shutil.copytree(hf_models["llama"][0], d)])


def test_hf_init_runs_stage_1_and_stage_2(hf_models, tmp_path):
    train_llm.main(TINY + [f"--init=hf:{hf_models['qwen3_tied_gqa2'][0]}", f"--out_dir={tmp_path}/llm", "--max_steps=1"])
    llm, cfg = M.load_llm(train_llm.find_checkpoint(f"{tmp_path}/llm"))
    assert cfg["model"]["rope_theta"] == 1e6 and llm.config.head_dim == 16  # the pretrained shape, not TINY's
    train_vlm.main(tiny_vlm_args(f"hf:{hf_models['smolvlm'][0]}", tmp_path / "vlm") + ["--max_steps=1", "--show_captions=0"])
    vlm, cfg, tokenizer = train_vlm.load_vlm(str(tmp_path / "vlm"))
    assert cfg["vision"]["image_size"] == 32 and cfg["vision"]["projector"] == "linear"
    assert vlm.image_token_id == tokenizer.special("<|image|>") == 1
    train_vlm.main(tiny_vlm_args(f"hf:{hf_models['llama'][0]}", tmp_path / "tower") + ["--max_steps=1", "--show_captions=0"])
    vlm, cfg, _ = train_vlm.load_vlm(str(tmp_path / "tower"))  # a pretrained LLM with a new tower of ours
    assert cfg["model"]["qk_norm"] is False and cfg["vision"]["projector"] == "mlp"


@pytest.fixture(scope="module")
def tiny_smolvlm_dir(tmp_path_factory):
    """The documented command's tiny directory: `python hf.py random-smolvlm DIR --size=tiny`."""
    d = tmp_path_factory.mktemp("smolvlm") / "tiny"
    hf.write_random_smolvlm(str(d), "tiny", vocab_text=eval_sim.language_corpus(40))
    return str(d)


def test_stage3_on_a_tiny_hf_smolvlm_trains_and_runs_closed_loop(tiny_smolvlm_dir, vla_world, tmp_path):
    out = str(tmp_path / "vla")
    train_vla.main(vla_args(vla_world, out, f"--init=hf:{tiny_smolvlm_dir}", "--max_steps=6", "--keypoints=3",
                            "--val_every=0", "--save_every=0"))
    cfg = json.load(open(f"{train_llm.find_checkpoint(out)}/config.json"))
    tokenizer = data.Tokenizer.load(f"{train_llm.find_checkpoint(out)}/tokenizer.json")
    marker, glob, image = (tokenizer.special_tokens[t] for t in ("<fake_token_around_image>", "<global-img>", "<image>"))
    assert data.vla_prompt(tokenizer, "reach the red block.", 4)[2:9] == [marker, glob] + [image] * 4 + [marker]
    assert cfg["action_expert"]["n_layer"] == 2 and cfg["action_expert"]["head_dim"] == 16  # the backbone's
    assert cfg["action_expert"]["patch_grid"] == 4 and cfg["action_expert"]["patch_dim"] == 32
    policy = train_vla.load_policy(out)
    records = eval_sim.evaluate(policy, tasks=["reach"], episodes_per_task=1, splits=("seen",), image_size=16)
    assert len(records) == 1
    train_vla.main(vla_args(vla_world, tmp_path / "token", f"--init=hf:{tiny_smolvlm_dir}", "--max_steps=1",
                            "--conditioning=action_token", "--vlm_layers=1", "--val_every=0", "--save_every=0"))
    vla, _ = M.load_vla(train_llm.find_checkpoint(str(tmp_path / "token")))
    assert vla.vlm.llm.config.n_layer == 1 and vla.action_expert.config.conditioning == "action_token"


def test_the_load_train_and_serve_path_never_imports_transformers(tiny_smolvlm_dir):
    code = ("import sys, hf, train_llm, train_vlm, train_vla, eval_sim; hf.load_vlm(sys.argv[1]); "
            "assert 'transformers' not in sys.modules and 'tokenizers' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code, tiny_smolvlm_dir], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1000:]


# ---- LeRobot data and the policy server (issue 19)
import threading  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
import io  # noqa: E402


def synthetic_episodes(n=3, size=(16, 16), seed=0):
    """Episodes whose every frame is a distinct smooth colour ramp (video codecs keep those within a few
    levels, and a frame matched to the wrong row would be far off), random states and actions."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size[1])[None, :, None]
    out = []
    for e in range(n):
        T = 5 + 2 * e
        images = {c: np.stack([(30 + ramp * rng.integers(40, 200, 3) + 0 * np.ones((size[0], 1, 1))).astype(np.uint8)
                               for _ in range(T)]) for c in ("scene", "wrist")}
        out.append({"images": images, "state": rng.random((T, 4), dtype=np.float32),
                    "action": rng.uniform(-1, 1, (T, 3)).astype(np.float32), "instruction": f"task number {e % 2}"})
    return out


def write_lerobot_v30(root, episodes, fps=10):
    """Ours (EpisodeWriter) then data.write_lerobot: the converter is the v3.0 writer."""
    w = data.EpisodeWriter(f"{root}_ours", ("scene", "wrist"), episodes[0]["images"]["scene"].shape[1:3],
                           eval_sim.STATE_NAMES, eval_sim.ACTION_NAMES, fps)
    for ep in episodes:
        w.add(ep["images"], ep["state"], ep["action"], ep["instruction"], "synthetic")
    w.close()
    return data.write_lerobot(f"{root}_ours", str(root), crf=0)


def write_lerobot_v21(root, episodes, fps=10):
    """A v2.1 directory by hand: one parquet and one mp4 per episode; the wrist camera stored as PNG
    images inside the parquet instead of a video."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    root, tasks = str(root), sorted({ep["instruction"] for ep in episodes})
    os.makedirs(f"{root}/meta", exist_ok=True)
    H, W = episodes[0]["images"]["scene"].shape[1:3]
    png = lambda im: (lambda b: (Image.fromarray(im).save(b, "PNG"), b.getvalue())[1])(io.BytesIO())
    lines, stats, start = [], [], 0
    for e, ep in enumerate(episodes):
        T = len(ep["action"])
        os.makedirs(f"{root}/data/chunk-000", exist_ok=True)
        pq.write_table(pa.table({
            "observation.state": pa.array(list(ep["state"]), pa.list_(pa.float32())),
            "action": pa.array(list(ep["action"]), pa.list_(pa.float32())),
            "observation.images.wrist": pa.array([{"bytes": png(im), "path": None} for im in ep["images"]["wrist"]]),
            "timestamp": pa.array(np.arange(T) / fps, pa.float32()), "frame_index": pa.array(range(T), pa.int64()),
            "episode_index": pa.array([e] * T, pa.int64()), "index": pa.array(range(start, start + T), pa.int64()),
            "task_index": pa.array([tasks.index(ep["instruction"])] * T, pa.int64())}),
            f"{root}/data/chunk-000/episode_{e:06d}.parquet")
        data.write_video(f"{root}/videos/chunk-000/observation.images.scene/episode_{e:06d}.mp4",
                         ep["images"]["scene"], fps, crf=0)
        lines.append({"episode_index": e, "tasks": [ep["instruction"]], "length": T})
        stats.append({"episode_index": e, "stats": {k: {**data.episode_stats(ep[ours]), "count": [T]}
                                                    for k, ours in (("observation.state", "state"), ("action", "action"))}})
        start += T
    feature = lambda dtype: {"dtype": dtype, "shape": [H, W, 3], "names": ["height", "width", "channels"]}
    info = {"codebase_version": "v2.1", "fps": fps, "chunks_size": 1000, "total_episodes": len(episodes),
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": {"observation.state": {"dtype": "float32", "shape": [4], "names": eval_sim.STATE_NAMES},
                         "action": {"dtype": "float32", "shape": [3], "names": {"motors": eval_sim.ACTION_NAMES}},
                         "observation.images.scene": feature("video"), "observation.images.wrist": feature("image")}}
    for name, rows in (("info.json", None), ("episodes.jsonl", lines), ("episodes_stats.jsonl", stats),
                       ("tasks.jsonl", [{"task_index": i, "task": t} for i, t in enumerate(tasks)])):
        with open(f"{root}/meta/{name}", "w") as f:
            f.write(json.dumps(info, indent=1) if rows is None else "".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_lerobot_windows_match_the_arrays_written_and_frames_are_decoded_once(version, tmp_path, monkeypatch):
    size = (16, 24) if version == "v2.1" else (16, 16)  # v2.1: 24 wide, letterboxed to the model's 16 x 16
    episodes = synthetic_episodes(size=size)
    root = (write_lerobot_v21 if version == "v2.1" else write_lerobot_v30)(tmp_path / "lr", episodes)
    cameras = ("scene", "observation.images.wrist")  # a camera by its short name or its feature key
    open_ds = lambda: data.EpisodeDataset(f"lerobot:{root}", n_frames=2, chunk_size=4, cameras=cameras, frame_stride=2,
                                          image_size=16, frame_cache=str(tmp_path / "cache"))
    ds = open_ds()
    assert len(ds) == sum(len(ep["action"]) for ep in episodes) and ds.meta["state_names"] == eval_sim.STATE_NAMES
    assert ds.meta["action_names"] == eval_sim.ACTION_NAMES and ds.meta["image_size"] == [16, 16]
    everything = lambda k: np.concatenate([ep[k] for ep in episodes])
    for key, ours in (("state", "state"), ("action", "action")):
        assert np.allclose(ds.stats[key]["mean"], everything(ours).mean(0), atol=1e-5)
        assert np.allclose(ds.stats[key]["std"], everything(ours).std(0), atol=1e-5)
        assert np.allclose(ds.stats[key]["max"], everything(ours).max(0))
    i = 0
    for ep in episodes:
        T = len(ep["action"])
        for t in range(T):
            item = ds[i]
            i += 1
            past = np.clip([t - 2, t], 0, None)
            assert np.array_equal(item["state"].numpy(), ep["state"][past])
            future = np.arange(t, t + 4)
            assert np.array_equal(item["actions"].numpy(), ep["action"][np.minimum(future, T - 1)])
            assert item["action_mask"].tolist() == (future < T).tolist() and item["instruction"] == ep["instruction"]
            for c, cam in enumerate(("scene", "wrist")):
                want = np.stack([data.letterbox(ep["images"][cam][p], 16) for p in past]).astype(int)
                err = np.abs(item["images"][c].numpy().astype(int) - want)
                assert err.mean() < 3 and err.max() <= 20, (cam, t, err.mean(), err.max())
                if cam == "wrist" and version == "v2.1":
                    assert err.max() == 0  # PNG images in the parquet are lossless
    monkeypatch.setattr(data, "decode_video_frames", lambda *a: pytest.fail("video decoded again"))
    monkeypatch.setattr(data, "fit_frame", lambda *a: pytest.fail("an image decoded again"))
    again = open_ds()  # the frame cache: memory-mapped, nothing decoded
    assert isinstance(again.episodes[0]["images"][0], np.memmap)
    assert all(torch.equal(ds[k]["images"], again[k]["images"]) for k in range(len(ds)))
    ours = data.read_lerobot_into_episodes(root, str(tmp_path / "ours"), ("scene", "wrist"), 16, str(tmp_path / "cache"))
    back = data.EpisodeDataset(ours, n_frames=2, chunk_size=4, frame_stride=2)  # the converter to our format
    assert all(torch.equal(ds[k][f], back[k][f]) for k in range(len(ds)) for f in ("images", "state", "actions"))


def test_lerobot_bad_inputs_are_one_line_errors_naming_the_file(tmp_path, monkeypatch, vla_world, capsys):
    import shutil
    root = write_lerobot_v30(tmp_path / "good", synthetic_episodes(n=2))
    read = lambda r, cams=("scene",): data.EpisodeDataset(f"lerobot:{r}", cameras=cams, frame_cache=str(tmp_path / "c"))

    def broken(name, edit):
        bad = tmp_path / name
        shutil.copytree(root, bad)
        edit(str(bad))
        return str(bad)

    def rewrite_info(r, change):
        info = json.load(open(f"{r}/meta/info.json"))
        change(info)
        json.dump(info, open(f"{r}/meta/info.json", "w"))

    def short_video(r):
        video = f"{r}/videos/observation.images.scene/chunk-000/file-000.mp4"
        data.write_video(video, np.zeros((6, 16, 16, 3), np.uint8), 10)

    cases = [(broken("noinfo", lambda r: os.remove(f"{r}/meta/info.json")), "meta/info.json not found"),
             (broken("noeps", lambda r: shutil.rmtree(f"{r}/meta/episodes")),
              "meta/episodes/chunk-XXX/file-XXX.parquet not found"),
             (broken("nostats", lambda r: os.remove(f"{r}/meta/stats.json")), "meta/stats.json not found"),
             (broken("dims", lambda r: rewrite_info(r, lambda i: i["features"]["action"].update(shape=[7]))),
              "file-000.parquet: action has 3 values per row, "),
             (broken("version", lambda r: rewrite_info(r, lambda i: i.update(codebase_version="v1.6"))),
              "expected codebase_version v2.1"),
             (broken("short", short_video), "file-000.mp4 is shorter than its episodes: it has 6 frames")]
    stats = json.load(open(f"{root}/meta/stats.json"))
    del stats["action"]["std"]
    cases.append((broken("badstats", lambda r: json.dump(stats, open(f"{r}/meta/stats.json", "w"))),
                  "meta/stats.json: expected mean, std, min and max of action"))
    for bad, message in cases:
        with pytest.raises(data.UserError, match=message.replace("(", r"\(")) as e:
            read(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(data.UserError, match=r"info.json has no camera 'top': its cameras are \['observation.images.scene'"):
        read(root, ("top",))
    lengths = broken("lengths", lambda r: None)  # the episode table says 6 rows where the data holds 5
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = f"{lengths}/meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index("length"), "length", pa.array([6, 7], pa.int64())), path)
    with pytest.raises(data.UserError, match="file-000.parquet holds 5 rows of episode 0, but the episode metadata says "
                                             "length 6"):
        read(lengths)
    for module in ("pyarrow.parquet", "av"):  # the extras missing: pip install pyarrow av
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)
            shutil.rmtree(tmp_path / "c", ignore_errors=True)
            with pytest.raises(data.UserError, match=f"needs {module.split('.')[0]} .*: pip install pyarrow av"):
                read(root)
    with pytest.raises(SystemExit) as e:  # through the CLI: one line, exit code 2
        train_llm.run(lambda: train_vla.main(vla_args(vla_world, tmp_path / "out", f"--demos=lerobot:{root}",
                                                      "--cameras=top")))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "has no camera 'top'" in err, err


def test_train_vla_trains_on_a_lerobot_dataset_and_scores_it_in_the_world(vla_world, tmp_path):
    lr = data.write_lerobot(vla_world.demos, str(tmp_path / "lr"))  # the built-in demos as a LeRobot v3.0 dataset
    out = str(tmp_path / "run")
    train_vla.main(vla_args(vla_world, out, f"--demos=lerobot:{lr}", f"--frame_cache={tmp_path}/frames",
                            "--max_steps=2", "--n_frames=2", "--eval_episodes=1", "--eval_splits=seen", "--gifs_per_task=0"))
    cfg = json.load(open(f"{out}/step_000002/config.json"))
    assert cfg["normalization"]["state_names"] == eval_sim.STATE_NAMES and cfg["policy"]["cameras"] == ["scene", "wrist"]
    assert len(json.load(open(f"{out}/eval/results.json"))["episodes"]) == len(eval_sim.TASKS)
    import glob
    assert len(glob.glob(f"{tmp_path}/frames/lr-*/observation.images.wrist-16x16.npy")) == 1


def tiny_policy(world, n_frames=1, seed=0):
    """A random-weight tiny VLAPolicy (same weights for the same seed), as load_policy builds one."""
    torch.manual_seed(seed)
    vla = tiny_vla(world.tokenizer, chunk_size=4, n_frames=n_frames).eval()
    stats = json.load(open(f"{world.demos}/stats.json"))
    normalization = {"state": data.Normalizer(stats["state"]).to_dict(),
                     "action": data.Normalizer(stats["action"], "minmax").to_dict(),
                     "state_names": eval_sim.STATE_NAMES, "action_names": eval_sim.ACTION_NAMES}
    settings = {"cameras": ["scene", "wrist"], "n_frames": n_frames, "chunk_size": 4, "execute_steps": 2,
                "flow_steps": 2, "image_size": 16}
    return train_vla.VLAPolicy(vla, world.tokenizer, settings, normalization)


class served:
    """`with served(policy) as url:` a policy server on a free loopback port, in a thread."""

    def __init__(self, policy):
        self.server = train_vla.make_server(policy, "127.0.0.1", 0)

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class Recorded:
    """A policy that keeps every chunk it returned."""

    def __init__(self, policy):
        self.policy, self.chunks = policy, []

    def bind(self, envs):
        self.policy.bind(envs)

    def act(self, obs_list):
        self.chunks.append(np.asarray(self.policy.act(obs_list)))
        return self.chunks[-1]


@pytest.mark.parametrize("n_frames", [1, 2])
def test_closed_loop_evaluation_through_the_server_equals_in_process(vla_world, n_frames):
    local, behind_server = Recorded(tiny_policy(vla_world, n_frames)), tiny_policy(vla_world, n_frames)
    run = lambda policy: eval_sim.evaluate(policy, ["reach", "pick_place"], 2, ("seen",), image_size=16, num_envs=3)
    with served(behind_server) as url:
        remote = Recorded(eval_sim.make_policy(url))
        assert remote.policy.info["cameras"] == ["scene", "wrist"] and remote.policy.info["n_frames"] == n_frames
        remote_records = run(remote)
    assert remote_records == run(local)  # the same successes and episode lengths on the same seeds
    assert len(remote.chunks) == len(local.chunks) > 20  # and the same actions at every call, bit for bit
    assert all(np.array_equal(a, b) for a, b in zip(remote.chunks, local.chunks))


def post(url, arrays=None, raw=None):
    """(HTTP status, reply body) of POST url/act with an .npz of arrays (or raw bytes)."""
    if raw is None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        raw = buf.getvalue()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/act", raw), timeout=60) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stress_server(url, seconds, clients=8):
    """Each client, until `seconds` pass, alternates a well-formed observation batch with one of the
    malformed requests; returns per client (answered well-formed, rejected malformed, failures)."""
    rng = np.random.default_rng(0)
    good = {"images/scene": rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8),
            "images/wrist": rng.integers(0, 256, (2, 20, 12, 3), dtype=np.uint8),
            "state": rng.random((2, 4), dtype=np.float32), "instruction": np.array(["put the red block in the bowl.", "x"])}
    bad = [({k: v for k, v in good.items() if k != "images/wrist"}, "lacks images/wrist"),
           (good | {"state": np.zeros((2, 5), np.float32)}, "state must be finite numbers of shape (2, 4)"),
           (good | {"images/scene": np.zeros((2, 16, 16), np.uint8)}, "images/scene must be uint8"),
           (good | {"images/scene": np.zeros((2, 16, 16, 3), np.float32)}, "images/scene must be uint8"),
           (b"GET me an action", "request body is not an .npz"), ({"hello": np.zeros(3)}, "observation lacks")]
    deadline, results = time.time() + seconds, []

    def client(c):
        ok = rejected = 0
        failures = []
        while time.time() < deadline:
            status, body = post(url, good)
            if status == 200 and data.read_npz(body)["actions"].shape == (2, 2, 3):
                ok += 1
            else:
                failures.append((status, body[:200]))
            arrays, message = bad[(ok + rejected + c) % len(bad)]
            status, body = post(url, *((None, arrays) if isinstance(arrays, bytes) else (arrays,)))
            if status == 400 and message in json.loads(body)["error"]:
                rejected += 1
            else:
                failures.append((status, body[:200], message))
        results.append((ok, rejected, failures))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_server_under_8_concurrent_clients_answers_every_good_request_and_rejects_bad_ones(vla_world):
    seconds = float(os.environ.get("NANOFOUNDRY_SERVER_STRESS_S", 10))  # 30 by hand: docs/robot_data.md
    with served(tiny_policy(vla_world)) as url:
        results = stress_server(url, seconds)
        assert json.loads(urllib.request.urlopen(url + "/info").read())["chunk_size"] == 4  # still serving
    assert len(results) == 8 and all(ok > 0 and rejected > 0 and not failures for ok, rejected, failures in results), \
        [r[2][:2] for r in results]
    print(f"{seconds:g} s, 8 clients: {sum(r[0] for r in results)} well-formed requests answered, "
          f"{sum(r[1] for r in results)} malformed ones rejected, no failures")  # shown with pytest -s
    with pytest.raises(data.UserError, match="unreachable"):
        eval_sim.make_policy(url)  # the server is gone: one line, not a traceback


# ---- Qwen3-VL (issue 17)
# Tiny random Qwen3VLForConditionalGeneration models that transformers builds and saves; ours load them
# from the directory (hf.py) and must give the same logits and greedy tokens for a prompt with one image.

QWEN3VL_CASES = {  # name: (n_head, n_kv_head, head_dim, mrope_section, deepstack layers, image px, tied)
    "gqa2_deepstack2_32px": (4, 2, 16, [2, 3, 3], [0, 1], 32, False),
    "gqa4_deepstack1_48px_tied": (4, 1, 8, [2, 1, 1], [1], 48, True),
    "mha_deepstack2_48px": (2, 2, 16, [4, 2, 2], [0, 2], 48, False),
}


def write_qwen3vl_tokenizer(directory):
    import hf
    base = data.Tokenizer.train("pick the red block and put it in the bowl " * 20, 280)
    hf.write_tokenizer(data.Tokenizer(base.ranks, base.pattern, {"<|endoftext|>": 280}), str(directory / "tokenizer.json"))


@pytest.fixture(scope="session")
def qwen3vl_dirs(tmp_path_factory):
    """name -> (directory, image size) of a tiny random transformers Qwen3-VL (vision patches of 8 px,
    a learned 8 x 8 position table that every image size here interpolates)."""
    transformers = pytest.importorskip("transformers")
    dirs = {}
    for name, (n_head, n_kv, head_dim, section, deepstack, px, tied) in QWEN3VL_CASES.items():
        cfg = transformers.Qwen3VLConfig(
            text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=head_dim,
                             rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": section,
                                              "mrope_interleaved": True}),
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                               out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=deepstack),
            image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293,
            tie_word_embeddings=tied)
        torch.manual_seed(len(dirs))
        directory = tmp_path_factory.mktemp(name)
        transformers.Qwen3VLForConditionalGeneration(cfg).save_pretrained(directory)
        write_qwen3vl_tokenizer(directory)
        dirs[name] = (directory, px)
    return dirs


def qwen3vl_reference_inputs(image, ids, patch=8, merge=2):
    """transformers' inputs for one image (B=1): pixel_values as its processor flattens them (2x2-merge
    blocks, each patch (channel, frame, row, column) with the still image as two identical frames)."""
    _, _, H, W = image.shape
    gh, gw = H // patch, W // patch
    x = ((image - 0.5) / 0.5).reshape(1, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, 2, -1, -1)
    return dict(input_ids=ids, pixel_values=x.reshape(gh * gw, 3 * 2 * patch * patch),
                image_grid_thw=torch.tensor([[1, gh, gw]]), mm_token_type_ids=(ids == 290).int(),
                attention_mask=torch.ones_like(ids))


def qwen3vl_prompt(n_visual, seed):
    g = torch.Generator().manual_seed(seed)
    before, after = torch.randint(0, 280, (4,), generator=g), torch.randint(0, 280, (5,), generator=g)
    return torch.cat([before, torch.tensor([292] + [290] * n_visual + [293]), after])[None]


@pytest.mark.parametrize("case", list(QWEN3VL_CASES))
def test_qwen3vl_logits_and_greedy_generation_equal_transformers(qwen3vl_dirs, case):
    import hf
    from transformers import Qwen3VLForConditionalGeneration
    directory, px = qwen3vl_dirs[case]
    ref = Qwen3VLForConditionalGeneration.from_pretrained(directory).eval()
    ours, tokenizer = hf.load_qwen3vl(str(directory), image_size=px)
    ours.eval()
    assert tokenizer.special("<|image|>") == 290 and ours.llm.config.tie_embeddings == QWEN3VL_CASES[case][-1]
    image = torch.rand(1, 3, px, px, generator=torch.Generator().manual_seed(1))
    ids = qwen3vl_prompt(ours.n_visual_tokens, seed=2)  # text, <|vision_start|> image <|vision_end|>, text
    inputs = qwen3vl_reference_inputs(image, ids)
    with torch.no_grad():
        theirs = ref(**inputs).logits
        mine, _ = ours(ids, image[:, None])
        assert (theirs - mine).abs().max().item() <= 1e-4
        want = ref.generate(**inputs, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, ids.size(1):]
    got = ours.generate(ids, image[:, None], 20, temperature=0)[0, ids.size(1):]
    assert got.tolist() == want.tolist()


def test_qwen3vl_text_positions_after_an_image_are_transformers_rope_index(qwen3vl_dirs):
    import hf
    from transformers import Qwen3VLForConditionalGeneration
    directory, px = qwen3vl_dirs["mha_deepstack2_48px"]
    ref = Qwen3VLForConditionalGeneration.from_pretrained(directory)
    ours, _ = hf.load_qwen3vl(str(directory), image_size=px)
    ids = qwen3vl_prompt(ours.n_visual_tokens, seed=3)
    inputs = qwen3vl_reference_inputs(torch.rand(1, 3, px, px), ids)
    want, _ = ref.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    assert torch.equal(ours.mrope_positions(ids == 290), want)


def test_qwen3vl_random_directory_writer_is_one_transformers_loads(tmp_path):
    """hf.py random-qwen3vl (our init, bf16 shards + index) writes a directory transformers reads as we do."""
    import hf
    from transformers import Qwen3VLForConditionalGeneration
    hf.write_random_qwen3vl(str(tmp_path), "tiny", vocab_text="pick the red block " * 30, shard_bytes=50_000)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    ref = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours, tokenizer = hf.load_qwen3vl(str(tmp_path))
    px = ours.vision_config.image_size
    image_tokens = tokenizer.image_placeholders(ours.n_visual_tokens)  # what our prompt builders write
    assert image_tokens == [tokenizer.special("<|vision_start|>")] + [tokenizer.special("<|image_pad|>")] * \
        ours.n_visual_tokens + [tokenizer.special("<|vision_end|>")]
    ids = torch.tensor([[3, 4] + image_tokens + [5, 6]])
    image = torch.rand(1, 3, px, px)
    inputs = qwen3vl_reference_inputs(image, ids, patch=4)
    inputs["mm_token_type_ids"] = (ids == tokenizer.special("<|image|>")).int()
    with torch.no_grad():
        assert (ref(**inputs).logits - ours.eval()(ids, image[:, None])[0]).abs().max().item() <= 1e-4


def test_qwen3vl_unsupported_directories_are_one_line_errors_and_exit_2(qwen3vl_dirs, tmp_path, capsys):
    import shutil
    import hf
    source, _ = qwen3vl_dirs["gqa2_deepstack2_32px"]
    cfg = json.loads((source / "config.json").read_text())
    broken = {
        "no image_token_id (a video-only model?)": lambda c: c.pop("image_token_id"),
        "mrope_section [2, 3, 4] must be three counts summing to head_dim / 2 = 8":
            lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 3, 4]),
        "rope scaling yarn is not supported": lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"),
        "vision_config hidden_act = 'quick_gelu' is not supported": lambda c: c["vision_config"].update(hidden_act="quick_gelu"),
        "deepstack_visual_indexes [0, 3] need tower layers < depth 3":
            lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 3]),
        "vision_config patch_size = [8, 8]: expected one integer": lambda c: c["vision_config"].update(patch_size=[8, 8]),
    }
    for k, (message, edit) in enumerate(broken.items()):
        directory = tmp_path / f"d{k}"
        shutil.copytree(source, directory)
        c = json.loads(json.dumps(cfg))
        edit(c)
        (directory / "config.json").write_text(json.dumps(c))
        with pytest.raises(SystemExit) as e:
            train_llm.run(lambda: hf.load_vlm(str(directory)))
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    with pytest.raises(data.UserError, match="image size 40 is not a multiple of"):
        hf.load_qwen3vl(str(source), image_size=40)


@pytest.fixture(scope="session")
def tiny_qwen3vl_dir(tmp_path_factory):
    """`python hf.py random-qwen3vl DIR --size=tiny`: a Qwen3-VL-shaped directory (DeepStack on, 64 px images)."""
    import hf
    return hf.write_random_qwen3vl(str(tmp_path_factory.mktemp("qwen3vl_tiny")), "tiny",
                                   vocab_text=eval_sim.language_corpus(60))


def test_qwen3vl_backbone_trains_stage2_and_stage3_end_to_end_with_both_conditionings(tiny_qwen3vl_dir, vla_world, tmp_path):
    """--init=hf:DIR on a tiny Qwen3-VL: stage 2 a few steps; stage 3 demos -> training -> closed-loop
    evaluation with prefix K/V, and training with the action token."""
    train_vlm.main([f"--init=hf:{tiny_qwen3vl_dir}", f"--out_dir={tmp_path}/vlm", "--max_steps=2", "--batch_size=4",
                    "--micro_batch=2", "--world_train=16", "--world_val=4", "--eval_every=100", "--eval_batches=1",
                    "--show_captions=0", "--compile=False", "--dtype=float32"])
    assert json.load(open(train_llm.find_checkpoint(f"{tmp_path}/vlm") + "/config.json"))["vision"]["deepstack_layers"] == [0]
    hf_args = lambda out, *extra: vla_args(vla_world, out, f"--init=hf:{tiny_qwen3vl_dir}", "--compile=False", *extra)
    train_vla.main(hf_args(tmp_path / "prefix", "--max_steps=2", "--eval_episodes=1"))
    results = json.load(open(tmp_path / "prefix" / "eval" / "results.json"))
    assert results["image_size"] == 16 and math.isfinite(json.loads(open(tmp_path / "prefix" / "metrics.jsonl").readline())["loss"])
    policy = train_vla.load_policy(str(tmp_path / "prefix"))
    assert policy.vla.vlm.llm.config.mrope_section == [2, 3, 3] and len(policy.vla.vlm.projector.deepstack) == 1
    train_vla.main(hf_args(tmp_path / "token", "--max_steps=2", "--conditioning=action_token", "--eval_episodes=0"))
    log = [json.loads(line) for line in open(tmp_path / "token" / "metrics.jsonl")]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)


def test_fsdp_two_processes_give_the_ddp_loss_curve_and_resume_exactly(vla_world, tmp_path):
    """torchrun --nproc_per_node=2 train_vla.py --fsdp on CPU (gloo): the loss curve of DDP, checkpoints
    in the same format, and a resume from step 2 reproduces step 3's weights bit for bit."""
    def torchrun(out, *extra):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "train_vla.py"] + vla_args(vla_world, out, "--micro_batch=1", "--max_steps=3",
                                                          "--val_fraction=0", *extra),
                              cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    ddp, fsdp = torchrun(tmp_path / "ddp"), torchrun(tmp_path / "fsdp", "--fsdp")
    assert len(ddp) == len(fsdp) == 3
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ddp, fsdp)) <= 1e-4
    straight = load_tensors(tmp_path / "fsdp" / "step_000003" / "model.safetensors")
    assert straight.keys() == load_tensors(tmp_path / "ddp" / "step_000003" / "model.safetensors").keys()
    import shutil
    shutil.rmtree(tmp_path / "fsdp" / "step_000003")
    (tmp_path / "fsdp" / "latest").write_text("step_000002\n")
    torchrun(tmp_path / "fsdp", "--fsdp", "--resume")
    resumed = load_tensors(tmp_path / "fsdp" / "step_000003" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


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
    image, caption, *_ = vlm_sample(5, 64, "train")
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
    assert train_vlm.caption_misses(["the red disc and the green disc."], truth) == (1, 1)  # red: wrong kind


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


def test_patch_facts_experiment_reads_cell_facts_off_the_towers_patches(tiny_llm_checkpoint, tmp_path):
    from eval_sim import KINDS
    args = tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "pf")
    model, tok = train_vlm.vlm_from_llm(train_vlm.parse_config(train_vlm.TrainConfig, args), ((0.5,) * 3, (0.5,) * 3))
    ex = train_vlm.world_example(0, "val", 16)
    idx = torch.tensor([data.encode_chat(tok, ex["turns"], model.n_visual_tokens, model.config.max_seq_len)[0]])
    _, _, extras = model(idx, train_vlm.model_view(ex, 16)[None], return_extras=True)
    grid = model.vision_config.grid  # 16 px / 4 px patches: the read-out's targets are per patch, not per visual token
    assert extras["patches"].shape == (1, grid * grid, 16) and model.n_visual_tokens < grid * grid
    labels = torch.tensor(ex["labels"]).float()
    facts = train_vlm.cell_facts(labels, grid)
    colours, _ = train_vlm.split_labels(labels)
    assert facts.shape == (1, grid * grid, train_vlm.CELL_FEATURES)
    assert facts[..., :6].sum() == colours[..., :len(KINDS)].sum() > 0 and facts[..., 16].sum() == 1  # every thing, one gripper
    rows = train_vlm.main(args + ["--max_steps=2", "--probe", "--probe_seeds=1", "--patch_facts=1.0", "--show_captions=0"])
    assert len(rows) == 1 and not os.path.exists(tmp_path / "pf" / "latest")
    with pytest.raises(data.UserError, match="--patch_facts is an experiment of the probe"):
        train_vlm.main(args + ["--patch_facts=1.0"])


def test_scene_labels_state_what_the_caption_says():
    from eval_sim import COLOUR_NAMES, KINDS, REGIONS, SCENE_LABEL_NAMES, region_of
    per = len(KINDS) + len(REGIONS) + 7
    for i in range(6):
        example = train_vlm.world_example(i, "val", 16)
        labels = torch.tensor(example["labels"][0])
        assert labels.shape == (len(SCENE_LABEL_NAMES),) and labels.min() >= 0 and labels.max() <= 1
        named = dict(train_vlm.caption_objects(example["caption"]))  # colour -> kind
        for c, colour in enumerate(COLOUR_NAMES):
            block = labels[c * per:(c + 1) * per]
            kinds = [k for k, v in zip(KINDS, block[:len(KINDS)]) if v]
            assert kinds == ([named[colour]] if colour in named else [])
            region = [r for r, v in zip(REGIONS, block[len(KINDS):len(KINDS) + len(REGIONS)]) if v]
            x, y = block[-7:-5].tolist()
            assert region == ([region_of(x, y)] if kinds else [])
        gripper = labels[len(COLOUR_NAMES) * per:]
        assert bool(gripper[0]) == ("the gripper is closed" in example["caption"]) and gripper[1:-2].sum() == 1
    # the loader hands them over with the batch, one row per image
    loader = data.ImageTextLoader(functools.partial(train_vlm.world_example, split="val", image_size=16), CharTokenizer(),
                                  2, 2048, 16, 4, num_examples=4, shuffle=False)
    assert torch.equal(loader.next_batch()[3], torch.tensor([train_vlm.world_example(i, "val", 16)["labels"] for i in (0, 1)]))


def test_oracle_probe_feeds_the_true_scene_facts_as_every_visual_token(tiny_llm_checkpoint, tmp_path, capsys):
    args = tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "oracle") + ["--max_steps=2", "--probe", "--probe_seeds=1",
                                                                      "--oracle=scene", "--distinct_words"]
    rows = train_vlm.main(args)
    assert rows[0]["images"]["all"][1] > 0 and "blanked" in capsys.readouterr().out
    cfg = train_vlm.parse_config(train_vlm.TrainConfig, args)
    model, tok = train_vlm.vlm_from_llm(cfg, ((0.5,) * 3, (0.5,) * 3))
    facts = torch.tensor([train_vlm.world_example(i, "val", 16)["labels"] for i in range(2)])  # (2, 1, k)
    idx = torch.tensor([data.encode_chat(tok, [("how many bowls are there?", None)], model.n_visual_tokens)[0]] * 2)
    embeds = model.embed(idx, facts)
    visual = embeds[idx == model.image_token_id].view(2, model.n_visual_tokens, -1)
    want = model.vision.linear(facts[:, 0].float())
    assert torch.allclose(visual, want[:, None].expand_as(visual)) and not torch.allclose(want[0], want[1])
    # --distinct_words: the colour and shape words no longer share their stage-1 embeddings
    rows = [tok.encode(" " + w)[0] for w in ["red", "green", "block", "disc"]]
    llm, _ = M.load_llm(train_llm.find_checkpoint(tiny_llm_checkpoint))
    assert not torch.allclose(model.llm.embed_tokens.weight[rows], llm.embed_tokens.weight[rows])
    with pytest.raises(data.UserError, match="--oracle .* needs --data=world and --probe"):
        train_vlm.main(tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "o2") + ["--oracle=scene"])


def test_stage1_reports_how_well_it_answers_from_a_caption_in_context(tiny_llm_checkpoint):
    tok = data.Tokenizer.load(os.path.join(train_llm.find_checkpoint(tiny_llm_checkpoint), "tokenizer.json"))
    llm, _ = M.load_llm(train_llm.find_checkpoint(tiny_llm_checkpoint))
    assert train_llm.context_qa_accuracy(llm, tok, n_scenes=3) == {}  # a 64-token context holds no caption
    torch.manual_seed(0)
    llm = M.Transformer(M.GPTConfig(vocab_size=llm.config.vocab_size, n_layer=1, n_embd=16, n_head=2, n_kv_head=1,
                                    head_dim=8, mlp_hidden=32, max_seq_len=512))
    counts = train_llm.context_qa_accuracy(llm, tok, n_scenes=3)
    asked = sum(len(eval_sim.vlm_sample(i, 64, "val")[2]) for i in range(3))
    assert counts["all"][1] == asked == sum(n for k, (_, n) in counts.items() if k != "all")
    assert 0 <= counts["all"][0] <= asked and list(counts)[-1] == "all"
    # --world_questions: more question lines per corpus document
    few, many = ([d.count("\nQ: ") for d in eval_sim.language_corpus(6, questions=q)] for q in (3, 8))
    assert few == [3] * 6 and all(3 < n <= 8 for n in many)


def test_cell_facts_put_each_object_and_the_gripper_in_the_cell_under_its_centre():
    from eval_sim import COLOUR_NAMES, KINDS
    for i in range(4):
        image, caption, _, labels = eval_sim.vlm_sample(i, 64, "val")
        facts = train_vlm.cell_facts(torch.tensor([labels]), 4)[0]  # (16, CELL_FEATURES)
        assert facts.shape == (16, train_vlm.CELL_FEATURES)
        named = dict(train_vlm.caption_objects(caption))  # colour -> kind
        found = {}
        for cell, f in enumerate(facts):
            for c in torch.nonzero(f[:6]).flatten().tolist():
                found[COLOUR_NAMES[c]] = cell
                assert f[6:9].sum() >= 1  # a kind comes with every colour
        assert set(found) == set(named)
        for colour, cell in found.items():  # the cell is the one under the object's centre in the image
            c = COLOUR_NAMES.index(colour)
            x, y = labels[c * 19 + 12], labels[c * 19 + 13]
            assert cell == min(int((1 - y) * 4), 3) * 4 + min(int(x * 4), 3)
            if sum(1 for k in found.values() if k == cell) == 1:  # alone in its cell: its kind and coordinates
                assert KINDS[facts[cell, 6:9].argmax()] == named[colour]
                assert facts[cell, 14:16].tolist() == pytest.approx([x, y])
        assert facts[:, 16].sum() == 1 and bool(facts[:, 17].sum()) == ("gripper is closed" in caption)


def test_more_question_sets_ask_about_more_objects_without_repeats():
    one = eval_sim.vlm_sample(3, 16, "train")[2]
    three = eval_sim.vlm_sample(3, 16, "train", question_sets=3)[2]
    assert three[:len(one)] == one and len(three) > len(one) and len(set(three)) == len(three)


def test_cell_facts_loss_trains_a_readout_that_is_saved_and_loaded(tiny_llm_checkpoint, tmp_path):
    out = str(tmp_path / "facts")
    train_vlm.main(tiny_vlm_args(tiny_llm_checkpoint, out) + ["--max_steps=2", "--cell_facts=1.0", "--world_question_sets=2"])
    model, cfg, _ = train_vlm.load_vlm(out)
    assert cfg["vision"]["fact_outputs"] == train_vlm.CELL_FEATURES
    assert model.projector.facts.weight.shape == (train_vlm.CELL_FEATURES, model.config.n_embd)
    # the loss: exact facts scored by their own logits are cheaper than the opposite guess
    facts = train_vlm.cell_facts(torch.tensor([eval_sim.vlm_sample(0, 16, "val")[3]]), 2)
    sure = (facts * 2 - 1) * 20
    sure[..., [14, 15, 18, 19]] = facts[..., [14, 15, 18, 19]]  # coordinates: the exact values
    assert train_vlm.cell_facts_loss(sure, facts) < 0.01 < train_vlm.cell_facts_loss(-sure, facts)


def test_score_answers_more_held_out_scenes_and_lists_the_mistakes(vla_world, capsys):
    result = train_vlm.main([f"--score={vla_world.vlm}", "--world_val=3", "--show_captions=1", "--dtype=float32"])
    examples = [train_vlm.world_example(i, "val", 16) for i in range(3)]
    n_questions = sum(q != data.CAPTION_PROMPT for ex in examples for q, _ in ex["turns"])
    assert result["all"][1] == n_questions == sum(n for kind, (_, n) in result.items() if kind != "all")
    out = capsys.readouterr().out
    assert "3 held-out scenes" in out and " -> " in out and "captions of 3 held-out scenes" in out  # random: wrong
    with pytest.raises(data.UserError, match="--score measures on the built-in world"):
        train_vlm.main([f"--score={vla_world.vlm}", "--data=pairs.jsonl"])


def test_cells_oracle_maps_each_cells_facts_plus_its_position(tiny_llm_checkpoint, tmp_path):
    args = tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "cells") + ["--probe", "--oracle=cells"]
    model, tok = train_vlm.vlm_from_llm(train_vlm.parse_config(train_vlm.TrainConfig, args), ((0.5,) * 3, (0.5,) * 3))
    facts = torch.tensor([train_vlm.world_example(i, "val", 16)["labels"] for i in range(2)])  # (2, 1, k)
    idx = torch.tensor([data.encode_chat(tok, [("how many bowls are there?", None)], model.n_visual_tokens)[0]] * 2)
    visual = model.embed(idx, facts)[idx == model.image_token_id].view(2, model.n_visual_tokens, -1)
    grid = round(model.n_visual_tokens ** 0.5)
    want = model.vision.linear(train_vlm.cell_facts(facts[:, 0].float(), grid)) + model.vision.position
    assert torch.allclose(visual, want)


# Token ids of the AnswerKeypoints unit tests: 0 <|endoftext|>, 1 <|user|>, 2 <|image|>, 3 <|assistant|>; words 10-19,
# answers 20-29. Two turns, each a question and its one-token answer:
TWO_TURNS = [[0, 1, 2, 2, 10, 11, 12, 3, 20, 0, 1, 13, 14, 3, 21, 0]]


def keypoint_masks(idx):
    """(words, turn, answer) of a row of the unit tests' ids, as VLM.question_words and the answer starts give them."""
    return (idx >= 10) & (idx < 20), (idx == 1).cumsum(1), idx == 3


def test_answer_keypoints_read_only_their_own_turns_question_and_land_on_its_answer_position():
    torch.manual_seed(0)
    keypoints = M.AnswerKeypoints(vocab_size=50, patch_dim=8, grid=4, n_embd=16, keypoints=2)
    with torch.no_grad():
        keypoints.weight.weight.normal_()
    idx = torch.tensor(TWO_TURNS)
    words, turn, answer = keypoint_masks(idx)
    assert keypoints.place_in_turn(words, turn)[0, [4, 5, 6, 11, 12]].tolist() == [0, 1, 2, 0, 1]
    patches = torch.randn(1, 16, 8)
    out = keypoints(idx, patches, words, turn, answer)
    assert out.shape == (1, 16, 16) and torch.nonzero(out.abs().sum(-1))[:, 1].tolist() == [7, 13]
    second_changed = idx.clone()
    second_changed[0, 12] = 15  # another word in the second question: the first answer's input is unchanged
    out2 = keypoints(second_changed, patches, words, turn, answer)
    assert torch.equal(out2[0, 7], out[0, 7]) and not torch.allclose(out2[0, 13], out[0, 13])
    first_changed = idx.clone()
    first_changed[0, 5] = 16
    assert not torch.allclose(keypoints(first_changed, patches, words, turn, answer)[0, 7], out[0, 7])


def test_answer_keypoints_hand_over_the_relations_of_each_pair():
    torch.manual_seed(0)
    idx = torch.tensor(TWO_TURNS)
    words, turn, answer = keypoint_masks(idx)
    patches = torch.randn(1, 16, 8)
    keypoints = M.AnswerKeypoints(vocab_size=50, patch_dim=8, grid=4, n_embd=16, keypoints=3, pairs=True)
    assert keypoints.out.in_features == 3 * (8 + 2) + 5 * 3  # per keypoint, then per pair (0, 1), (0, 2), (1, 2)
    read = []
    keypoints.out.register_forward_hook(lambda module, inputs, output: read.append(inputs[0]))
    _, attention = keypoints(idx, patches, words, turn, answer, return_attention=True)
    xy = torch.einsum("bapk,pd->bakd", attention["patches"], keypoints.xy)  # (1, 2 answers, 3, 2)
    for n, (k, l) in enumerate([(0, 1), (0, 2), (1, 2)]):
        d = xy[:, :, l] - xy[:, :, k]
        want = torch.cat([d.abs(), d.norm(dim=-1, keepdim=True), d.sign()], -1)
        assert torch.allclose(read[0][..., 30 + 5 * n: 35 + 5 * n], want, atol=1e-4)


def test_answer_glimpse_crops_the_pixels_where_each_keypoint_points_in_each_image():
    torch.manual_seed(0)
    keypoints = M.AnswerKeypoints(vocab_size=50, patch_dim=8, grid=8, n_embd=16, keypoints=2, glimpse=16)
    images = torch.zeros(1, 2, 3, 64, 64)
    images[0, 1, :, 40:44, 20:24] = 1.0  # a square in the second image only
    w = torch.zeros(1, 1, 2 * 64, 2)  # (B, A, patches of both images, K)
    w[0, 0, 64 + 5 * 8 + 2, 0] = 1.0  # keypoint 0: the second image's patch (column 2, row 5), centre pixel (20, 44)
    w[0, 0, 0, 1] = 1.0               # keypoint 1: the first image's top-left patch
    crops = []
    keypoints.glimpse[0].register_forward_hook(lambda module, inputs, output: crops.append(inputs[0]))
    features = keypoints.glimpses(images, w.transpose(2, 3))  # it takes (B, A, K, P)
    first, second = crops[0].view(2, 1, 2, 3, 16, 16)[:, 0]  # (images, keypoints, 3, G, G)
    rows, cols = torch.nonzero(second[0, 0] > 0.5, as_tuple=True)  # pixels 36..51 down, 12..27 across
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 7, 8, 11) and second[1].abs().sum() == 0
    assert first.abs().sum() == 0  # the first image is blank
    # each keypoint's features: its crop's in the image holding its mass (here all of it in one image)
    cnn = lambda crop: keypoints.glimpse(crop[None]).amax((-2, -1))[0]
    assert torch.allclose(features[0, 0, 0], cnn(second[0]), atol=1e-6)
    assert torch.allclose(features[0, 0, 1], cnn(first[1]), atol=1e-6)


def test_answer_dense_glimpse_is_the_cnn_over_the_image_max_pooled_in_each_patch_the_keypoint_weighs():
    torch.manual_seed(0)
    keypoints = M.AnswerKeypoints(vocab_size=50, patch_dim=8, grid=4, n_embd=16, keypoints=2, glimpse=8,
                                  glimpse_dense=True)
    images = torch.randn(1, 1, 3, 32, 32)
    w = torch.zeros(1, 1, 16, 2)
    w[0, 0, 6, 0] = 1.0                     # keypoint 0: patch (column 2, row 1) = pixels 8..15 down, 16..23 across
    w[0, 0, 0, 1] = w[0, 0, 15, 1] = 0.25   # keypoint 1: half its mass here (the rest on another camera), half each
    f = keypoints.glimpse(images[:, 0])     # (1, 64, 16, 16): stride 2, so patch (c, r) is [4r:4r+4, 4c:4c+4]
    patch = lambda c, r: f[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].amax((-2, -1))
    got = keypoints.dense_glimpses(images, w.transpose(2, 3))  # (B, A, K, P)
    assert torch.allclose(got[0, 0, 0], patch(2, 1), atol=1e-6)
    assert torch.allclose(got[0, 0, 1], (patch(0, 0) + patch(3, 3)) / 2, atol=1e-6)


def test_answer_summary_and_glimpse_read_the_first_image_only():
    # stage 2 trains them on one camera; stage 3's second (the wrist) would hand them features never trained on
    torch.manual_seed(0)
    keypoints = M.AnswerKeypoints(vocab_size=50, patch_dim=8, grid=4, n_embd=16, keypoints=2, glimpse=4, summary=3)
    with torch.no_grad():
        keypoints.sharpness.fill_(-30.0)  # flat keypoints: the same places whatever the patches
    read = []
    keypoints.out.register_forward_hook(lambda module, inputs, output: read.append(inputs[0][0, 0]))
    idx = torch.tensor([[1, 10, 11, 3]])
    words, turn, answer = keypoint_masks(idx)
    patches, images = torch.randn(1, 32, 8), torch.randn(1, 2, 3, 16, 16)  # two images of 4 x 4 patches
    other_patches, other_images = patches.clone(), images.clone()
    other_patches[0, 16:] = torch.randn(16, 8)  # the second image's patches and pixels replaced
    other_images[0, 1] = torch.randn(3, 16, 16)
    keypoints(idx, patches, words, turn, answer, images)
    keypoints(idx, other_patches, words, turn, answer, other_images)
    per_keypoint = [r[:2 * (8 + 2 + 64)].view(2, 8 + 2 + 64) for r in read]  # pooled features, place, glimpse
    assert not torch.allclose(per_keypoint[0][:, :8], per_keypoint[1][:, :8])  # the keypoints see both images
    assert torch.allclose(per_keypoint[0][:, 10:], per_keypoint[1][:, 10:], atol=1e-6)  # the glimpse: the first
    assert torch.allclose(read[0][-3:], read[1][-3:]) and read[0][-3:].abs().sum() > 0  # the summary: the first


def test_answer_near_pulls_keypoint_1_towards_keypoint_0_only_when_the_question_asks():
    keypoints = M.AnswerKeypoints(vocab_size=50, patch_dim=4, grid=4, n_embd=8, keypoints=2, near=True)
    with torch.no_grad():
        for table in (keypoints.near, keypoints.weight, keypoints.query):
            table.weight.zero_()
        keypoints.near.weight[12] = 1.0  # word 12 ("nearest") asks for a strong pull: softplus(10 * 1 - 4) = 6
        query = keypoints.query.weight.view(50, 4, 2)  # (word, feature, keypoint)
        query[10, 2, 0] = 5.0          # keypoint 0 looks for feature 2
        query[10, :2, 1] = 5.0         # keypoint 1 for features 0 and 1
    patches = torch.zeros(1, 16, 4)
    patches[0, 0, 2] = 1.0                         # patch 0 (top left): keypoint 0's
    patches[0, 1, :2] = torch.tensor([1.0, 0.0])   # patch 1, beside it: score 5 for keypoint 1
    patches[0, 15, :2] = torch.tensor([1.0, 0.4])  # patch 15 (bottom right): score 7, its best match, far away
    for question, want in (([10, 11], 15), ([10, 12], 1)):
        idx = torch.tensor([[1, *question, 3]])
        words, turn, answer = keypoint_masks(idx)
        _, attention = keypoints(idx, patches, words, turn, answer, return_attention=True)
        w = attention["patches"][0, 0]  # (16 patches, 2 keypoints)
        assert w[:, 0].argmax() == 0 and w[:, 1].argmax() == want  # with word 12: the match nearest keypoint 0


def test_answer_every_token_reads_at_each_answer_token_and_generation_matches_the_full_forward(tiny_llm_checkpoint,
                                                                                                 tmp_path):
    torch.manual_seed(0)
    args = tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "e") + [
        "--answer_keypoints=2", "--answer_every_token", "--answer_summary=4", "--answer_glimpse=4"]
    no_glimpse = train_vlm.vlm_from_llm(train_vlm.parse_config(train_vlm.TrainConfig, args[:-1] + ["--answer_glimpse=0"]),
                                        ((0.5,) * 3, (0.5,) * 3))[0].vision_config  # the grey, dense defaults go with it
    assert (no_glimpse.answer_glimpse, no_glimpse.answer_glimpse_grey, no_glimpse.answer_glimpse_dense) == (0, False, False)
    model, tok = train_vlm.vlm_from_llm(train_vlm.parse_config(train_vlm.TrainConfig, args), ((0.5,) * 3, (0.5,) * 3))
    model.eval()
    with torch.no_grad():  # the read-out's tables large enough to change every answer token's prediction
        for name, p in model.projector.answer_keypoints.named_parameters():
            p.normal_(0.0, 0.5 if p.dim() > 1 else 1.0)
    read = []
    hook = model.projector.answer_keypoints.register_forward_hook(lambda module, inputs, output: read.append(output[0]))
    # read at each turn's <|assistant|> and its answer's tokens, up to (not with) its <|endoftext|>
    turns = [("how many bowls are there?", "two"), ("describe the image.", "the red disc is on the left side.")]
    idx = torch.tensor([data.encode_chat(tok, turns, model.n_visual_tokens)[0]])
    images = torch.rand(2, 1, 3, 16, 16)
    model(idx, images[:1])
    at = read[-1][0].abs().sum(-1) > 0
    assert tok.decode(idx[0, at].tolist()) == "<|assistant|> two<|assistant|> the red disc is on the left side."
    # nor at a batch's padding after a row's last answer (whose <|endoftext|> is only a target): the short row's
    # logits are those of the row alone
    short, long = (data.encode_chat(tok, t, model.n_visual_tokens)[0][:-1] for t in (turns[:1], turns))
    batch = torch.tensor([short + [tok.special("<|pad|>")] * (len(long) - len(short)), long])
    padded = model(batch, images)[0]
    assert read[-1][0, len(short) - 3:len(short)].abs().sum() > 0 and read[-1][0, len(short):].abs().sum() == 0
    assert torch.allclose(padded[0, :len(short)], model(torch.tensor([short]), images[:1])[0][0], atol=1e-5)
    hook.remove()
    # greedy generation (one token at a time, each read at as it comes) = the argmax of one forward over the result;
    # <|endoftext|> never predicted, so that every new token is an answer token
    model.llm.lm_head.register_forward_hook(lambda module, inputs, output: output.index_fill(
        -1, torch.tensor([tok.special("<|endoftext|>")]), -1e4))
    prompt = [data.encode_chat(tok, [(q, None)], model.n_visual_tokens)[0] for q in ("what colour is the bowl?",
                                                                                      "describe the image.")]
    for ids, image in zip(prompt, images):  # one row at a time: the prompts differ in length
        ids = torch.tensor([ids])
        out = model.generate(ids, image[None], max_new_tokens=6, temperature=0)
        logits, _ = model(out, image[None])
        assert torch.equal(logits[0, ids.size(1) - 1:-1].argmax(-1), out[0, ids.size(1):])
        assert model.answer_tokens(out, (out == tok.special("<|user|>")).cumsum(1))[0, ids.size(1):].all()


def test_answer_offsets_place_each_keypoint_within_half_a_patch_of_its_patches_centres():
    torch.manual_seed(0)
    idx = torch.tensor(TWO_TURNS)
    words, turn, answer = keypoint_masks(idx)
    patches = torch.randn(1, 16, 8)
    keypoints = M.AnswerKeypoints(vocab_size=50, patch_dim=8, grid=4, n_embd=16, keypoints=2, offsets=True)
    with torch.no_grad():
        keypoints.offset.weight.zero_(), keypoints.offset.bias.zero_()  # as VLM.init_vision_weights: at the centres
        _, at_centres = keypoints(idx, patches, words, turn, answer, return_attention=True)
        assert torch.allclose(at_centres["xy"], torch.einsum("bapk,pd->bakd", at_centres["patches"], keypoints.xy))
        keypoints.offset.bias.fill_(100.0)  # every patch: its thing at its lower right corner
        _, moved = keypoints(idx, patches, words, turn, answer, return_attention=True)
    assert torch.equal(moved["patches"], at_centres["patches"])  # where they look is unchanged, only the place
    assert torch.allclose(moved["xy"], at_centres["xy"] + 1 / 3)  # half of the 2 / (grid - 1) between centres
    # the grounding target: a thing at the centre of patch (row 1, column 2) of a 4 x 4 grid lies at that patch's place
    from eval_sim import COLOUR_NAMES
    labels = torch.zeros(1, len(train_vlm.SCENE_LABEL_NAMES))
    red = COLOUR_NAMES.index("red") * 19
    labels[0, red + 12], labels[0, red + 13] = 2.5 / 4, 1 - 1.5 / 4
    assert train_vlm.thing_patches(labels, 4)[0, COLOUR_NAMES.index("red")] == 6
    assert torch.allclose(train_vlm.thing_places(labels, 4)[0, COLOUR_NAMES.index("red")], keypoints.xy[6])


def test_answer_fine_aims_the_keypoints_over_a_grid_twice_as_fine_as_the_patches(tiny_llm_checkpoint, tmp_path):
    torch.manual_seed(0)
    c = M.VisionConfig(image_size=16, patch_size=4, n_layer=1, n_embd=16, n_head=2, head_dim=8, mlp_hidden=32,
                       stem="conv", answer_fine=True)
    tower, images = M.VisionTower(c), torch.rand(2, 3, 16, 16)
    patches, _, fine = tower(images, return_layers=True)
    assert c.answer_grid == 8 and patches.shape == (2, 16, 16) and fine.shape == (2, 64, 16)
    stem = F.relu(tower.conv_stem[0](tower.standardize(images)))  # the stem's last-but-one map: 8 x 8
    own_patch = patches.view(2, 4, 4, 16).repeat_interleave(2, 1).repeat_interleave(2, 2)  # each cell's patch
    assert torch.allclose(fine.view(2, 8, 8, 16), own_patch + tower.fine(stem.permute(0, 2, 3, 1)), atol=1e-5)
    with pytest.raises(ValueError, match="answer_fine reads the conv stem"):
        M.VisionTower(M.VisionConfig(image_size=16, patch_size=4, stem="patch", answer_fine=True))
    # in the VLM the answer keypoints (and their grounding) aim over the 8 x 8 cells; the LLM still reads 4 x 4 patches
    args = tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "fine") + ["--vision_stem=conv", "--answer_fine"]
    model, tok = train_vlm.vlm_from_llm(train_vlm.parse_config(train_vlm.TrainConfig, args), ((0.5,) * 3, (0.5,) * 3))
    ex = train_vlm.world_example(0, "val", 16)
    idx = torch.tensor([data.encode_chat(tok, ex["turns"], model.n_visual_tokens, model.config.max_seq_len)[0]])
    _, _, extras = model(idx, train_vlm.model_view(ex, 16)[None], return_extras=True)
    assert extras["keypoints"]["patches"].shape[2] == 64 and extras["patches"].shape == (1, 16, 16)
    # grounding: the cross-entropy against the thing's patch (its four cells' mass), the distance in patches
    turns = [("where is the gripper?", "blue")]
    idx = torch.tensor([data.encode_chat(tok, turns, model.n_visual_tokens)[0]])
    labels = torch.tensor(ex["labels"])
    word_index = train_vlm.ground_word_index(tok, model.config.vocab_size, verbose=False)
    with torch.no_grad():
        for p in model.projector.answer_keypoints.parameters():
            p.normal_(0.0, 0.3)
        kp = model(idx, train_vlm.model_view(ex, 16)[None], return_extras=True)[2]["keypoints"]
    patch, place = train_vlm.thing_patches(labels, 4)[0, 6], train_vlm.thing_places(labels, 8)[0, 6]  # 6: the gripper
    row, col = divmod(patch.item(), 4)
    mass = [kp["patches"][0, 0, :, k].view(8, 8)[2 * row:2 * row + 2, 2 * col:2 * col + 2].sum() for k in range(2)]
    assert torch.allclose(train_vlm.per_patch(kp["patches"][..., 0], 4, fine=True)[0, 0, patch], mass[0])  # as pointing
    distance2 = [((kp["xy"][0, 0, k] - place) * 7 / 2 / 2).square().sum() for k in range(2)]  # (8 - 1) / 2: in cells
    assert train_vlm.grounding_loss(kp, idx, labels, word_index, 8, places=True, fine=True).item() == pytest.approx(
        torch.stack([-mass[0].log(), distance2[0], -mass[1].log(), distance2[1]]).mean().item(), rel=1e-5)
    train_vlm.main(args + ["--max_steps=2", "--show_captions=0"])
    reloaded, _, _ = train_vlm.load_vlm(str(tmp_path / "fine"))
    assert reloaded.vision_config.answer_fine and reloaded.vision.fine.weight.shape == (16, 16)


def test_grounding_every_token_and_places_add_the_named_things_targets(tiny_llm_checkpoint, tmp_path):
    from eval_sim import COLOUR_NAMES
    args = tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "g") + ["--answer_keypoints=2", "--answer_every_token",
                                                                 "--answer_offsets"]
    model, tok = train_vlm.vlm_from_llm(train_vlm.parse_config(train_vlm.TrainConfig, args), ((0.5,) * 3, (0.5,) * 3))
    assert torch.count_nonzero(model.projector.answer_keypoints.offset.weight) == 0
    ex = train_vlm.world_example(0, "val", 16)
    caption = "the blue disc is left of the gripper."  # short: the tiny LLM has 64 positions
    turns = [("where is the gripper?", "blue"), ("describe the image.", caption)]
    idx = torch.tensor([data.encode_chat(tok, turns, model.n_visual_tokens)[0]])
    labels = torch.tensor(ex["labels"])
    word_index = train_vlm.ground_word_index(tok, model.config.vocab_size, verbose=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.projector.answer_keypoints.parameters():
            p.normal_(0.0, 0.3)  # aims away from uniform, with no probability near the loss's clamp
        _, _, extras = model(idx, train_vlm.model_view(ex, 16)[None], return_extras=True)
    every, kp = extras["keypoints"]["every"], extras["keypoints"]
    thing, has = train_vlm.named_targets(every, idx, word_index)
    named = idx.gather(1, every["at"])[has]  # the answer tokens that name a thing, each read aimed at that thing
    assert tok.decode(named.tolist()).split() == [w for w in ("blue " + caption).replace(".", "").split()
                                                  if w in train_vlm.ground_words() and len(tok.encode(" " + w)) == 1]
    assert len(named) == 3  # the answer's "blue", the caption's "blue" and "gripper" (the tiny tokenizer splits "red")
    patch_of, place_of = train_vlm.thing_patches(labels, 4)[0], train_vlm.thing_places(labels, 4)[0]
    base = [-kp["patches"][0, 0, patch_of[6], k].log() for k in range(2)]  # the first question names the gripper
    extra = [-every["patches"][0, a, patch_of[t], 0].log() for a, t in zip(has[0].nonzero()[:, 0], thing[0][has[0]])]
    assert train_vlm.grounding_loss(kp, idx, labels, word_index, 4, every_token=True).item() == pytest.approx(
        torch.stack(base + extra).mean().item(), rel=1e-5)
    places = [((kp["xy"][0, 0, k] - place_of[6]) * 3 / 2).square().sum() for k in range(2)]
    assert train_vlm.grounding_loss(kp, idx, labels, word_index, 4, places=True).item() == pytest.approx(
        torch.stack([base[0], places[0], base[1], places[1]]).mean().item(), rel=1e-5)


def test_grounding_loss_points_each_keypoint_at_the_objects_its_question_names(tiny_llm_checkpoint, tmp_path, capsys):
    from eval_sim import COLOUR_NAMES
    args = tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "g") + ["--answer_keypoints=2"]
    model, tok = train_vlm.vlm_from_llm(train_vlm.parse_config(train_vlm.TrainConfig, args), ((0.5,) * 3, (0.5,) * 3))
    single = [c for c in COLOUR_NAMES if len(tok.encode(" " + c)) == 1]  # the tiny tokenizer splits some colour words

    def names_two(q):
        return " left of " in q and sum(c in single for c in q.replace("?", "").split()) == 2
    ex = next(e for e in map(lambda i: train_vlm.world_example(i, "val", 16), range(200))
              if any(names_two(q) for q, _ in e["turns"]))
    two = next(q for q, _ in ex["turns"] if names_two(q))  # names two objects by colour, then no object at all
    turns = [(two, "yes"), ("how many bowls are there?", "two"), ("is the gripper open or closed?", "open")]
    idx = torch.tensor([data.encode_chat(tok, turns, model.n_visual_tokens)[0]])
    labels = torch.tensor(ex["labels"])  # (1 image, 126)
    with torch.no_grad():
        model.projector.answer_keypoints.query.weight.normal_()
        _, _, extras = model(idx, train_vlm.model_view(ex, 16)[None], return_extras=True)
    attention = extras["keypoints"]["patches"]  # (1, 3 answers, 16 patches, 2 keypoints)
    assert train_vlm.ground_words() == COLOUR_NAMES + ["gripper"] and len(tok.encode(" gripper")) == 1
    lut = torch.full((model.config.vocab_size,), -1)
    lut[[tok.encode(" " + c)[0] for c in single + ["gripper"]]] = torch.tensor([COLOUR_NAMES.index(c) for c in single] + [6])
    loss = train_vlm.grounding_loss(extras["keypoints"], idx, labels, lut, grid=4)
    first, second = [c for c in two.replace("?", "").split() if c in COLOUR_NAMES]
    patch = {c: train_vlm.table_cell(labels[0, COLOUR_NAMES.index(c) * 19 + 12], labels[0, COLOUR_NAMES.index(c) * 19 + 13], 4)
             for c in (first, second)}
    gripper = train_vlm.table_cell(labels[0, -2], labels[0, -1], 4)
    want = -(attention[0, 0, patch[first], 0].log() + attention[0, 0, patch[second], 1].log()  # answer 2: no target
             + attention[0, 2, gripper, 0].log() + attention[0, 2, gripper, 1].log()) / 4  # answer 3: both on the gripper
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # the probe's diagnostic: the share of held-out questions whose keypoints' top patch is the named thing's
    hits = train_vlm.pointing_accuracy(model, tok, [ex], 16)
    assert len(hits) == 2 and all(0 <= h <= 1 for h in hits)
    train_vlm.main(tiny_vlm_args(tiny_llm_checkpoint, tmp_path / "none") + ["--max_steps=1", "--show_captions=0",
                                                                            "--answer_keypoints=0"])
    assert "ground_keypoints off: this model has no answer keypoints" in capsys.readouterr().out  # on by default, off with nothing to point


def test_auto_dtype_is_bf16_only_where_the_hardware_multiplies_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(train_llm, "cpu_has_native_bf16", lambda: native)
        assert train_llm.resolve_dtype(cpu, "auto") == want  # emulated bf16 would be ~150x slower
        assert train_llm.resolve_dtype(cuda, "auto") == "bfloat16"
        assert train_llm.resolve_dtype(cpu, "float32") == "float32"


def test_bf16_autocast_trains_stage_2_and_3_with_answer_keypoints(tiny_llm_checkpoint, vla_world, tmp_path, capsys):
    """bf16 autocast is the default on CUDA (and on CPUs with native bf16): a bf16 linear's output must not meet
    an fp32 buffer (AnswerKeypoints' scatter once did: the default stage 2 crashed on GPU)."""
    vlm = str(tmp_path / "vlm")
    train_vlm.main(tiny_vlm_args(tiny_llm_checkpoint, vlm) + ["--max_steps=2", "--answer_keypoints=2", "--dtype=bfloat16",
                                                          "--answer_glimpse=8", "--answer_near"])  # the options too
    log = [json.loads(line) for line in open(f"{vlm}/metrics.jsonl")]
    assert all(math.isfinite(r["loss"]) for r in log)
    train_vla.main(vla_args(vla_world, tmp_path / "vla", f"--init={vlm}", "--max_steps=2", "--dtype=bfloat16"))
    assert os.path.exists(tmp_path / "vla" / "step_000002" / "model.safetensors")
    # --freeze_glimpse (the default): the glimpse CNN leaves stage 3 as stage 2 left it (trained and EMA weights);
    # the read-out moved
    before = load_tensors(f"{train_llm.find_checkpoint(vlm)}/model.safetensors")
    after = load_tensors(f"{tmp_path}/vla/step_000002/model.safetensors")
    keypoints = "projector.answer_keypoints."
    glimpse = [k for k in before if k.startswith(keypoints + "glimpse.")]
    assert glimpse and all(torch.equal(after[f"{w}.vlm.{k}"], before[k]) for k in glimpse for w in ("policy", "ema"))
    assert not torch.equal(after[f"policy.vlm.{keypoints}out.weight"], before[keypoints + "out.weight"])
    assert train_vla.load_policy(str(tmp_path / "vla")).vla.action_expert.config.answer_points == 2
    train_vla.probe_keypoints(train_vla.parse_config(train_vla.TrainConfig, [f"--out_dir={tmp_path / 'vla'}"]), 2)
    assert re.search(r"from each of the VLM's answer keypoints .*: #0 -?[\d.]+, #1 -?[\d.]+$", capsys.readouterr().out, re.M)


def test_vlm_with_answer_keypoints_trains_saves_loads_and_answers(tiny_llm_checkpoint, tmp_path):
    out = str(tmp_path / "ak")
    train_vlm.main(tiny_vlm_args(tiny_llm_checkpoint, out) + ["--max_steps=2", "--answer_keypoints=2", "--ground_keypoints=1.0"])
    model, cfg, tok = train_vlm.load_vlm(out)
    assert cfg["vision"]["answer_keypoints"] == 2 and model.prompt_start_id == tok.special("<|user|>")
    ex = train_vlm.world_example(0, "val", 16)
    images = train_vlm.model_view(ex, 16)
    prompt = torch.tensor([data.encode_chat(tok, [(ex["turns"][0][0], None)], model.n_visual_tokens)[0]])
    with torch.no_grad():
        plain = model.llm.embed_tokens(prompt)
        grounded = model.embed(prompt, images[None])
    is_text = prompt[0] != model.image_token_id
    changed = torch.nonzero(~torch.isclose(grounded[0, is_text], plain[0, is_text]).all(-1)).flatten()
    assert prompt[0, is_text][changed].tolist() == [tok.special("<|assistant|>")]  # only the answer position
    assert len(train_vlm.answer_questions(model, tok, [(images, ex["turns"][0][0])], max_new_tokens=3)) == 1

