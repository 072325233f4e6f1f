"""sft.py: the rollout's token layout with loss on assistant tokens only, the data formats, and a loss that falls."""
import json
import random

import pytest
import torch

import envs
import eval as ev
import models
import rollout
import sft
import train
from rollout import RolloutConfig

EVAL = RolloutConfig(greedy=True, show_reward=False, eval_mode=True, progress=False)


def expert_episodes(gyms, n=2, split="train", seed=0):
    return ev.evaluate("expert", None, ev.select_tasks(gyms, split, n), EVAL, seed=seed)[1]


def runs(mask):
    """(start, end) of each run of 1s in a 0/1 list."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_only_assistant_tokens_carry_loss(tiny):
    _, tok = tiny
    for rec in expert_episodes(["function", "persuade"]):
        ids, mask = sft.episode_tokens(tok, rec["messages"])
        said = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        # each run of loss tokens is exactly one assistant turn plus its end-of-turn token, in order
        assert [tok.decode(ids[a:b]) for a, b in runs(mask)] == [s + tok.eos_token for s in said]
        prompt = rollout.render_ids(tok, rec["messages"][:2], add_generation_prompt=True)
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
        # between two turns: the observation the env returned, wrapped as the template wraps a tool message
        head, tail = rollout.observation_wrapper(tok)
        gaps = [tok.decode(ids[b:a]) for (_, b), (a, _) in zip(runs(mask), runs(mask)[1:])]
        replies = [m["content"] for m in rec["messages"][3::2]]
        assert gaps == [head + r + tail for r in replies[:len(gaps)]]
        assert len(ids) == runs(mask)[-1][1]  # nothing after the last assistant turn


class Scripted(torch.nn.Module):
    """The tiny model steered to a fixed token sequence: at position p its argmax is script[p + 1]."""

    def __init__(self, model, script):
        super().__init__()
        self.model, self.script = model, torch.tensor(script)
        self.config, self.generation_config = model.config, model.generation_config

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, logits_to_keep=0,
                **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
        kept = position_ids[:, position_ids.shape[1] - out.logits.shape[1]:]
        target = self.script[(kept + 1).clamp(max=len(self.script) - 1)]
        out.logits.scatter_add_(-1, target[..., None], torch.full_like(out.logits[..., :1], 1e4))
        return out


@pytest.mark.parametrize("name", ["tiny", "tiny-demo"])
def test_tokens_are_the_rollouts_tokens(name, tiny, demo_tokenizer):
    """SFT builds, from an episode's messages, the token sequence the rollout produced for it.

    Which episode: the rollout's ids are the tokens the policy SAMPLED, and text decoded from sampled tokens does
    not always re-encode to the same tokens (a random model samples "a" + "b" where the tokenizer has "ab"), so a
    sampled episode of a random model is no reference. Here the policy is steered (a logit bias of 1e4 at each
    position p toward token p + 1 of the sequence SFT built) so that greedy decoding samples exactly the tokens SFT
    says an expert's turns are. The environment answers the same text with the same observations, so the rollout
    plays the expert's episode. Everything else in its ids is the rollout's own work (the prompt, where each turn
    ends, the observation wrapping, where the ids stop): if SFT placed any token elsewhere, the steering would
    make the policy say something else and the sequences would differ. Both the tiny tokenizer and the demo
    tokenizer (whose added tokens span the system turn and the tool-call JSON) are checked."""
    model, tok = tiny if name == "tiny" else (models.build_tiny_model(demo_tokenizer), demo_tokenizer)
    for rec in expert_episodes(["function", "intention"], n=1):
        task = next(t for t in envs.load_tasks(rec["gym"], "train") if t["id"] == rec["task_id"])
        ids, mask = sft.episode_tokens(tok, rec["messages"])
        [ep] = rollout.rollout(Scripted(model, ids), tok, [(rec["gym"], task)], 1, EVAL)
        assert ep.ids == ids and ep.loss_mask == mask, rec["gym"]
        # the same conversation (the expert's replies came back as user messages, the rollout's as tool messages)
        assert [m["content"] for m in ep.messages] == [m["content"] for m in rec["messages"]]
        assert ep.info["score"] == rec["score"]


@pytest.fixture(scope="module")
def demo_tokenizer():
    return models.build_demo_tokenizer()


def test_sft_lowers_the_loss_on_its_data(tiny):
    _, tok = tiny
    model = models.build_tiny_model(tok, seed=1)
    examples, dropped = sft.build_examples(tok, [{"messages": r["messages"]} for r in
                                                 expert_episodes(["telepathy", "function"], n=3)], 4096)
    assert dropped == 0 and len(examples) == 6
    before = sft.mean_loss(model, examples, tok.pad_token_id, "cpu")
    cfg = train.Config(sft_steps=12, sft_lr=1e-2, sft_warmup=0.1, sft_batch_size=3, micro_batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    losses = sft.train_sft(model, optimizer, examples, cfg, tok.pad_token_id)
    after = sft.mean_loss(model, examples, tok.pad_token_id, "cpu")
    assert len(losses) == 12
    assert after < 0.6 * before, (before, after)
    # the token-mean loss does not depend on how a batch is cut into micro-batches
    a, b = (sft.mean_loss(model, examples, tok.pad_token_id, "cpu", micro_batch_size=k) for k in (1, 6))
    assert a == pytest.approx(b, rel=1e-5)


def test_reads_episodes_and_sharegpt(tmp_path):
    recs = expert_episodes(["persuade"], n=2)
    recs[1]["failed"], recs[1]["score"] = True, None
    path = tmp_path / "episodes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    data = sft.read_sft_data(str(path))
    assert len(data) == 1 and data[0]["messages"] == recs[0]["messages"]  # the failed episode is dropped
    assert sft.read_sft_data(str(path), min_score=1.5) == []
    share = {"system": "sys", "tools": "[]", "conversations": [
        {"from": "human", "value": "hello"},
        {"from": "function_call", "value": json.dumps({"name": "interact_with_env",
                                                       "arguments": {"choice": "action", "content": "why?"}})},
        {"from": "observation", "value": "because"},
        {"from": "gpt", "value": "<think>\nok\n</think>\n\nbye"}]}
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([share]))
    [conv] = sft.read_sft_data(str(path))
    assert [m["role"] for m in conv["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    call = conv["messages"][2]["content"]
    assert envs.parse_action(call) == envs.Action("action", "why?") and call.startswith("<tool_call>\n")


@pytest.mark.parametrize("content, message", [
    ("{not json", "line 1: not valid JSON"),
    ('{"text": "x"}', "line 1: neither an episode"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}', r"conversations\[0\]"),
    ('{"conversations": [{"from": "function_call", "value": "call it"}]}', "must be JSON"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "start with a system and a user"),
])
def test_bad_data_names_the_file_and_line(tmp_path, tiny, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(sft.SFTDataError, match=message) as e:
        sft.build_examples(tiny[1], sft.read_sft_data(str(path)), 4096)
    assert str(path) in str(e.value)


def test_min_score_needs_scores(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"system": "s", "conversations": [{"from": "human", "value": "u"},
                                                                  {"from": "gpt", "value": "a"}]}]))
    with pytest.raises(sft.SFTDataError, match="has none"):
        sft.read_sft_data(str(path), min_score=0.5)
    # the default (0) filters nothing a score could: ShareGPT records pass it
    assert len(sft.read_sft_data(str(path), min_score=train.Config().sft_min_score)) == 1


def test_episodes_cut_by_the_budget_or_max_new_tokens_are_left_out_and_observations_are_the_envs(tmp_path):
    calls = [{"id": c, "function": {"name": "interact_with_env", "arguments": {}}} for c in "ab"]
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "a", "content": "the env's reply"},
            {"role": "tool", "tool_call_id": "b", "content": "Not executed: only the first tool call is executed."},
            {"role": "assistant", "content": "done"}]
    assert sft.turns_of(conv)[1][0][1] == "the env's reply"
    path = tmp_path / "episodes.jsonl"
    path.write_text("".join(json.dumps({"messages": conv, "score": 1.0, "end_reason": end, "cut_turns": cut}) + "\n"
                            for end, cut in (("done", 0), ("budget", 0), ("done", 1))))
    assert [c["messages"] for c in sft.read_sft_data(str(path))] == [conv]


def test_schedule_warms_up_then_decays():
    lrs = [sft.lr_at(s, 20, 1.0, 0.1) for s in range(20)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.01


def test_length_batches_cover_every_example_once_and_group_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(400)]
    batches = sft.length_batches(lengths, 8, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 100  # random batches of 8 spread over ~700 tokens
