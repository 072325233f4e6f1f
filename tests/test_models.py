"""The offline tiny-model harness: tokenizer, chat template, model, save/load."""
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
