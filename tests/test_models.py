"""The offline tiny-model harness: tokenizer, chat template, model, save/load; the bf16 rollout copy."""
import copy

import pytest
import torch

import envs
import models
import train

MESSAGES = [
    {"role": "system", "content": "You help the user."},
    {"role": "user", "content": "Find the rule for 1 2 3 4."},
    {"role": "assistant", "content": "<think>Try a query.</think>",
     "tool_calls": [{"type": "function", "function": {"name": "interact_with_env",
                                                      "arguments": {"choice": "action", "content": "1 2 3 4"}}}]},
    {"role": "tool", "content": "For numbers [1, 2, 3, 4], the result is 10"},
    {"role": "assistant", "content": "The answer.",
     "tool_calls": [{"type": "function", "function": {"name": "interact_with_env",
                                                      "arguments": '{"choice": "answer", "content": "10"}'}}]},
]


def test_special_tokens_are_single_ids_and_pad_is_not_eos(tiny):
    _, tok = tiny
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>"
    for t in models.SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, t
    assert len(tok) <= models.TINY_VOCAB


def test_template_renders_tool_calls_and_round_trips_ids(tiny):
    _, tok = tiny
    text = tok.apply_chat_template(MESSAGES, tools=[envs.TOOL_SCHEMA], tokenize=False)
    assert '<tool_call>\n{"name": "interact_with_env", "arguments": {"choice": "action", "content": "1 2 3 4"}}\n</tool_call><|im_end|>' in text
    assert '{"choice": "answer", "content": "10"}' in text  # string arguments are rendered as given
    assert "<|im_start|>user\n<tool_response>\nFor numbers [1, 2, 3, 4], the result is 10\n</tool_response><|im_end|>" in text
    assert '"name": "interact_with_env"' in text.split("<|im_start|>user")[0]  # the tool schema sits in the system turn
    assert text.count("<|im_start|>system") == 1
    ids = tok.apply_chat_template(MESSAGES, tools=[envs.TOOL_SCHEMA], tokenize=True, return_dict=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    gen = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|im_start|>assistant\n")


def test_tiny_is_deterministic_per_seed():
    m1, t1 = train.load_model("tiny", seed=1)
    m2, t2 = train.load_model("tiny", seed=1)
    m3, _ = train.load_model("tiny", seed=2)
    assert t1.get_vocab() == t2.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))


def test_forward_backward_and_generate_on_cpu(tiny):
    model, tok = tiny
    ids = torch.tensor([tok.apply_chat_template(MESSAGES[:2], tokenize=True, return_dict=False,
                                                add_generation_prompt=True)])
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    gen = model.generate(ids, max_new_tokens=8, do_sample=True, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1] and torch.equal(gen[0, : ids.shape[1]], ids[0])


def test_save_and_reload_through_load_model(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model2, tok2 = train.load_model(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    text = tok.apply_chat_template(MESSAGES, tools=[envs.TOOL_SCHEMA], tokenize=False)
    assert tok2.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert tok2.pad_token_id == tok.pad_token_id and tok2.eos_token_id == tok.eos_token_id


def test_untied_tiny_model_has_its_own_head(tiny):
    _, tok = tiny
    tied = models.build_tiny_model(tok, tie_word_embeddings=True)
    untied = models.build_tiny_model(tok, tie_word_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_unknown_model_name_is_a_clear_error():
    try:
        train.load_model("no-such-model")
    except ValueError as e:
        assert "no-such-model" in str(e)
    else:
        raise AssertionError("expected ValueError")


# ---- the rollout copy


def _qwen3_geometry(seed=0):
    """Qwen3's attention geometry (head_dim 128, RoPE theta 1e6) in 2 small layers. initializer_range 0.1, not
    0.02: at 0.02 a random model attends almost uniformly, so positions barely matter; trained models attend
    sharply, and 0.1 makes this one position-sensitive enough to show a RoPE error."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=128, rope_theta=1e6,
                      max_position_embeddings=40960, tie_word_embeddings=True, initializer_range=0.1,
                      attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(cfg).eval()


def _logprobs(model, ids, autocast: bool):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids).logits.float()
    return torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)


def _late_gap(model, copy_, ids, start=2000):
    """Mean and max |log p| gap at positions >= start: the copy (pure bf16, as rollouts run) against the
    training forward (fp32 weights under bf16 autocast, as models.hidden_states runs)."""
    gap = (_logprobs(copy_, ids, False) - _logprobs(model, ids, True)).abs()[start:]
    return gap.mean().item(), gap.max().item()


def test_a_model_loaded_in_bf16_keeps_its_rope_buffers():
    # load_model("tiny", dtype=bf16) (eval.py --dtype bfloat16, the hf user on CUDA) casts parameters only, as
    # rollout_copy does: model.to(bf16) rounded inv_freq (off by 1.8e-4, cos by up to 0.36 below position 2,048)
    fp32, _ = models.load_model("tiny")
    bf16, _ = models.load_model("tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert bf16.lm_head.weight is bf16.model.embed_tokens.weight  # the tie survives the cast
    for name, b in bf16.named_buffers():
        assert torch.equal(b, dict(fp32.named_buffers())[name]), name


def test_rollout_copy_keeps_rope_exact_and_matches_the_training_forward():
    model = _qwen3_geometry()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 512, (1, 2304), generator=torch.Generator().manual_seed(0))
    rc = models.rollout_copy(model, torch.bfloat16)

    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in rc.parameters())
    assert rc.lm_head.weight is rc.model.embed_tokens.weight                  # the tie survives
    bufs = dict(model.named_buffers())
    assert {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"} <= set(bufs)
    for name, b in rc.named_buffers():                                          # no floating buffer changed dtype
        assert b.dtype == bufs[name].dtype and torch.equal(b, bufs[name]), name
    assert all(p.dtype == torch.float32 for p in model.parameters())            # the training model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    # bf16 noise, measured: the training forward against the same weights in plain fp32 (no rounding at all).
    # The rollout copy rounds the weights and the residual stream to bf16 besides, so its gap may be a little
    # larger (measured 1.2x the mean, 1.1x the max); a RoPE error grows with the position and is not noise.
    noise = (_logprobs(model, ids, False) - _logprobs(model, ids, True)).abs()[2000:]
    mean, worst = _late_gap(model, rc, ids)
    assert mean <= 1.5 * noise.mean().item() and worst <= 2 * noise.max().item(), (mean, worst, noise.mean())

    # what train.py did before: deepcopy().to(bf16) also rounds inv_freq; the same check fails (measured: mean
    # 0.21 against a noise mean of 0.017, 12x; max 1.5 nats)
    old = copy.deepcopy(model).to(torch.bfloat16)
    assert old.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    old_mean, old_worst = _late_gap(model, old, ids)
    assert old_mean > 4 * noise.mean().item() and old_worst > 4 * noise.max().item(), (old_mean, old_worst)


def test_refresh_rollout_copy_follows_the_trained_weights():
    model = _qwen3_geometry()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    rc = models.rollout_copy(model, torch.bfloat16)
    assert model.is_activation_checkpointing and not rc.is_activation_checkpointing and not rc.training
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    assert not torch.equal(rc.model.norm.weight, model.model.norm.weight.bfloat16())
    models.refresh_rollout_copy(rc, model)
    for (name, p), (_, q) in zip(model.named_parameters(), rc.named_parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.bfloat16()), name
    assert rc.lm_head.weight is rc.model.embed_tokens.weight
    other = models.build_tiny_model(train.load_model("tiny")[1])
    with pytest.raises(ValueError, match="no parameter 'model.embed_tokens.weight' of shape"):
        models.refresh_rollout_copy(other, model)
