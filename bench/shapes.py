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
