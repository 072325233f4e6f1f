"""Loading the policy: a real model from the Hugging Face hub or a local folder, or the offline tiny model.

    model, tok = load_model("Qwen/Qwen3-4B")        # hub id (needs internet the first time)
    model, tok = load_model("runs/x/ckpt-000010")   # a local folder, e.g. one of our checkpoints
    model, tok = load_model("tiny", seed=0)         # offline: random Qwen3-architecture model + local BPE

The tiny model exists so that the demo and the tests run anywhere, with no GPU and no download: a Qwen3
decoder (hidden 64, 2 layers, 4 heads) initialised from a seed, and a byte-level BPE tokenizer trained in
well under a second on this repository's own task data, wrapped as a `PreTrainedTokenizerFast` with the
special tokens and a Qwen-style chat template that renders tool calls. It is the same code path as a real
model everywhere else: rollout, log-probs, checkpoints.

The rollout copy: generation runs on its own unsharded copy of the policy (bf16 when training in bf16), made by
`rollout_copy` and refreshed from the trained weights every step by `refresh_rollout_copy`. Only PARAMETERS are
cast: buffers such as RoPE's `inv_freq` keep the training model's dtype and values. `model.to(bfloat16)` would
round inv_freq too, and at Qwen3's geometry (head_dim 128, theta 1e6) the rotation angles then drift with the
position (cos off by 1.6 at position 2,000), so the tokens would be sampled from another model than the one
trained (tests/test_models.py measures it).

The training forward's inputs and outputs, shared by GRPO (train.py) and SFT (sft.py): `pad_batch` right-pads
token sequences with their loss masks, `hidden_states` runs the model and returns only its final hidden states
(the vocab projection is grpo.py's fused log-prob, on loss positions only), `head_weight` is that projection.
"""
import copy
import functools
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent

# Qwen-family special tokens. The pad token is deliberately not the eos token: code that infers padding
# from `ids == eos` silently drops every end-of-turn token from the loss (see anchors: TRL #4974).
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                  "<think>", "</think>"]
TINY_VOCAB = 1536
DEMO_VOCAB = 8192
DEMO_SHAPE = {"hidden": 128, "layers": 2, "heads": 4}  # see the README's demo section

# A Qwen-style chat template of our own wording. Structure (what matters for token ids) follows Qwen3:
# tools are listed in the system turn; an assistant tool call is `<tool_call>\n{json}\n</tool_call>`;
# consecutive tool results are rendered together inside ONE user turn, each as
# `<tool_response>\n...\n</tool_response>`; every turn ends with `<|im_end|>\n`.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nThese functions are available. Their signatures are inside <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nTo call one, write a JSON object with its name and arguments between "
    "<tool_call></tool_call> tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for tc in (message.tool_calls or []) %}"
    "{%- set f = tc.function if tc.function is defined else tc %}"
    "{%- if loop.first and not message.content %}{{- '<tool_call>\\n' }}{%- else %}{{- '\\n<tool_call>\\n' }}{%- endif %}"
    "{{- '{\"name\": \"' + f.name + '\", \"arguments\": ' }}"
    "{%- if f.arguments is string %}{{- f.arguments }}{%- else %}{{- f.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tiny_corpus(bytes_per_file: int = 25_000) -> str:
    """The text the tiny tokenizer is trained on: the start of each gym's training tasks (data/*/train.jsonl).

    Task data, not code: editing a module must not change the tokenizer (and with it every tiny-model test)."""
    files = sorted(ROOT.glob("data/*/train.jsonl"))
    return "\n".join(f.read_text(encoding="utf-8")[:bytes_per_file] for f in files)


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB, texts: list[str] | None = None):
    """Train a byte-level BPE on `texts` (default: the lines of `tiny_corpus()`) and wrap it as a
    PreTrainedTokenizerFast with our template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts if texts is not None else tiny_corpus().splitlines(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=IM_END,
                                      additional_special_tokens=SPECIAL_TOKENS[1:], clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def demo_corpus(render, tasks_per_gym: int = 40) -> list[str]:
    """The demo tokenizer's training text: the lines of `tiny_corpus()` (the training tasks), plus, for the first
    `tasks_per_gym` training tasks of every gym, its rendered prompt and one expert episode (turns and replies,
    seeded): the words the demo's agent reads and writes. `render`: a tokenizer whose chat template renders prompts."""
    import random

    import envs
    import rollout

    texts = tiny_corpus().splitlines()
    for gym in envs.GYMS:
        for task in envs.load_tasks(gym, "train")[:tasks_per_gym]:
            env = envs.make_env(gym, task, eval_mode=True)
            texts.append(render.apply_chat_template(rollout.prompt_messages(env), tools=[envs.TOOL_SCHEMA],
                                                    add_generation_prompt=True, tokenize=False))
            rng, done = random.Random(0), False
            while not done:
                turn = env.expert_action(rng)
                observation, _, done, _ = env.step(turn)
                texts += [turn + IM_END, observation]
    return texts


def prompt_blocks(render) -> list[str]:
    """The texts the demo tokenizer holds as single tokens: each gym's rendered system turn (its system prompt and
    the tool block, up to the first user turn) cut at the turn limit, so that any `max_turns` gives the same two
    blocks around its number, and the three fixed pieces of a tool call."""
    import envs

    blocks, mark = [], "\x00"
    for gym in envs.GYMS:
        env = envs.make_env(gym, envs.load_tasks(gym, "train")[0])
        env.max_turns = mark  # system() formats its prompt with it
        system = env.system()
        text = render.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": "u"}],
                                          tools=[envs.TOOL_SCHEMA], tokenize=False)
        blocks += text[:text.index(IM_START + "user")].split(mark)
    return blocks + ['<tool_call>\n{"name": "interact_with_env", "arguments": {"choice": "', '", "content": "',
                     '"}}\n</tool_call>']


def build_demo_tokenizer(vocab_size: int = DEMO_VOCAB):
    """The demo's tokenizer; trained once per process (about 3 s), each call gets its own copy."""
    return copy.deepcopy(_demo_tokenizer(vocab_size))


@functools.lru_cache(maxsize=2)
def _demo_tokenizer(vocab_size: int):
    """A byte-level BPE trained on `demo_corpus()`, plus `prompt_blocks()` as added tokens. A prompt is then its
    system turn as three tokens (two blocks around the turn limit) plus the opening message (intention: 17 tokens,
    against 561 with the tiny tokenizer, whose 350-token tool block it never saw), and a tool call's fixed JSON is
    three tokens, so the demo spends its CPU time on the words the agent chooses, whole words as single tokens."""
    from tokenizers import AddedToken

    render = build_tiny_tokenizer()
    tok = build_tiny_tokenizer(vocab_size, demo_corpus(render))
    tok.add_tokens([AddedToken(b, normalized=False, special=False) for b in prompt_blocks(render)])
    return tok


def build_tiny_model(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                     tie_word_embeddings: bool = True):
    """A randomly initialised Qwen3 decoder sized for CPU tests (about 0.2M parameters)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         head_dim=hidden // heads, max_position_embeddings=16384, tie_word_embeddings=tie_word_embeddings,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def cast_parameters(model, dtype: torch.dtype):
    """`model` with its floating parameters in `dtype` and its buffers as they are (RoPE's inv_freq stays fp32:
    see the module docstring; `model.to(dtype)` would round it too)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def load_model(name_or_path: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """`"tiny"` builds the offline tiny model and tokenizer; anything else is a hub id or a local folder."""
    if name_or_path == "tiny":
        tokenizer = build_tiny_tokenizer()
        return cast_parameters(build_tiny_model(tokenizer, seed=seed), dtype), tokenizer
    if name_or_path == "tiny-demo":
        tokenizer = build_demo_tokenizer()
        return cast_parameters(build_tiny_model(tokenizer, seed=seed, **DEMO_SHAPE), dtype), tokenizer
    if not os.path.isdir(name_or_path) and "/" not in name_or_path:
        raise ValueError(f"model {name_or_path!r} is neither 'tiny', 'tiny-demo', a local folder, nor a hub id like "
                         "'Qwen/Qwen3-4B'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # The loss mask never comes from ids, but generation pads finished rows and must not emit eos as pad.
        raise ValueError(f"{name_or_path}: the tokenizer's pad token must exist and differ from eos "
                         f"(pad={tokenizer.pad_token!r}, eos={tokenizer.eos_token!r})")
    return model, tokenizer


def rollout_copy(model, dtype: torch.dtype):
    """A copy of `model` for generation: floating parameters cast to `dtype`, everything else as it is.

    Buffers (RoPE's inv_freq and original_inv_freq, ...) keep their dtype and values, so positions rotate exactly
    as in the training forward. Ties survive (a tied lm_head stays the embedding). The copy is in eval mode,
    without gradients or gradient checkpointing, on the model's device.

    Peak memory on that device: the training model plus the copy's parameters in `dtype` (for an fp32 model of
    P parameters and a bf16 copy, 4P + 2P bytes), since each parameter is cast straight from the training
    tensor; `copy.deepcopy(model).to(bf16)` held a second fp32 model first (4P + 4P). Make the copy before
    sharding the model (FSDP2): a sharded module cannot be copied, its parameters are DTensor shards.
    """
    params = list(model.parameters())
    if any(hasattr(p, "full_tensor") for p in params):
        raise ValueError("rollout_copy: the model's parameters are sharded (DTensor): make the copy before "
                         "fully_shard, then keep it current with refresh_rollout_copy")
    # deepcopy consults the memo before copying anything: each parameter (and every module that shares it, as
    # a tied lm_head does) gets the cast tensor below, and the rest of the module tree is copied as it is
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype if p.is_floating_point() else p.dtype, copy=True),
                                      requires_grad=False) for p in params}
    out = copy.deepcopy(model, memo)
    if getattr(out, "is_activation_checkpointing", False):
        out.activation_checkpointing_disable()
    return out.eval()


@torch.no_grad()
def refresh_rollout_copy(rollout_model, model):
    """Copy the trained parameters of `model` into its rollout copy (cast on the way); buffers do not train.

    `model` may be sharded with FSDP2: each DTensor parameter is gathered in full (`full_tensor()`, a collective
    every rank must join, in the same order) one at a time, so the transient extra memory is one parameter in
    the training dtype."""
    dst = dict(rollout_model.named_parameters())
    for name, p in model.named_parameters():
        if name not in dst or dst[name].shape != p.shape:
            raise ValueError(f"refresh_rollout_copy: the rollout copy has no parameter {name!r} of shape "
                             f"{tuple(p.shape)} (is it a copy of this model?)")
        dst[name].copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)


# ----------------------------------------------------------------------------------------------------------
# The training forward (GRPO and SFT)


def pad_batch(examples: list, pad_id: int, device):
    """ids [B, T] right-padded, attention mask [B, T], and the loss mask of next-token targets [B, T-1], from
    `examples` [(ids, loss_mask)]. The attention mask and the loss mask are separate tensors on purpose."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    lmask = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, (x, m) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        attn[i, :len(x)] = 1
        lmask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids.to(device), attn.to(device), lmask[:, 1:].to(device)


def hidden_states(model, ids, attn, bf16: bool):
    """Final (normed) hidden states of every position. The model's own forward is called, so FSDP gathers
    its shards, but only one position's logits are computed: the vocab projection happens in grpo.py, on
    loss positions only. The output is caught by a hook on the decoder's final norm rather than asked for
    with `output_hidden_states`, which would keep every layer's output alive (layers + 1 tensors of
    [rows, T, hidden]: 3.3 GB at Qwen3-4B in the no-grad pass, where nothing else needs them)."""
    caught = []
    hook = model.get_decoder().norm.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids, attention_mask=attn, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return caught[0]


def head_weight(model):
    """The vocab projection's weight (the lm_head, or the embedding it is tied to)."""
    return model.get_output_embeddings().weight
