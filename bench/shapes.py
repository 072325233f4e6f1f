"""Random models with the shapes of real ones, for the benchmarks (no download: weights are random)."""
import torch


def qwen05b_shape(tokenizer, layers: int):
    """A random model with Qwen2.5-0.5B's shape (vocab 151,936, hidden 896, 14 heads, 2 KV heads, MLP 4,864,
    24 layers). It runs with the tiny tokenizer: ids past its 1,536 decode to nothing, which only shortens the
    text the env sees."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=32768, rope_theta=1e6, attn_implementation="sdpa",
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# Qwen3 dense models as their public config.json files on the Hugging Face hub (Qwen/Qwen3-*) give them. All have
# head_dim 128, 8 KV heads, q/k RMSNorm, RoPE theta 1e6 and a vocab of 151,936 (151,669 tokens padded to a multiple
# of 128); the three small ones tie the lm_head to the embedding.
QWEN3 = {
    "Qwen3-0.6B": dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=151936,
                       tied=True),
    "Qwen3-1.7B": dict(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=6144, vocab=151936,
                       tied=True),
    "Qwen3-4B": dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728, vocab=151936,
                     tied=True),
    "Qwen3-8B": dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288, vocab=151936,
                     tied=False),
    "Qwen3-32B": dict(hidden=5120, layers=64, heads=64, kv_heads=8, head_dim=128, intermediate=25600, vocab=151936,
                      tied=False),
}


def qwen3_model(shape: dict, tokenizer, seed: int = 0, device=None, **overrides):
    """A random Qwen3ForCausalLM of `shape` (a QWEN3 entry; `overrides` replace its keys, e.g. layers=2 or
    vocab=1536), built directly on `device`, fp32, in eval mode. Pad and eos ids come from the tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    s = {**shape, **overrides}
    cfg = Qwen3Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], tie_word_embeddings=s["tied"],
                      rope_theta=1e6, max_position_embeddings=40960, attn_implementation="sdpa",
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
