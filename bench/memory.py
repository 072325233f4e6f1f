"""The per-GPU memory plan of a training config: what train.py holds on each GPU in each phase of a GRPO step,
computed from the model's shape (no GPU, no download, no weights).

    python bench/memory.py --config configs/userrl-qwen3-4b.json --gpus 8
    python bench/memory.py --config configs/userrl-qwen3-8b.json --gpus 8 --gpu-gb 141     # H200
    python bench/memory.py --config configs/demo.json --gpus 1 --quick                      # --quick: the same

The model's shape comes from, in this order: a local folder's config.json (--model is a folder), the Hugging
Face cache (a hub id downloaded before; never the network), or bench/shapes.py's table of the Qwen3 family.
Parameter counts come from the transformers model class itself, built on the meta device (no memory).

Phases (the columns): startup (train.set_up: the model is loaded on the CPU, the rollout copy cast there and moved
to the GPU, then fully_shard moves one group at a time to the GPU and keeps this rank's shard of it),
rollout (KV-cached generation on the rollout copy), logprob (old log-probs, a no-grad forward of the training
model), loss (the fused GRPO loss of one micro-batch, after its forward), backward (the decoder's backward, one
layer recomputed at a time with gradient checkpointing; under FSDP2 each micro-batch's gradients are
reduce-scattered into the sharded fp32 gradients), step (clip + fused AdamW). Every phase holds the sharded
training state and the rollout copy. "update" in the JSON line is the largest of loss, backward and step. Host
memory (each rank's CPU copy of the model at start-up) is printed below the table.

What is an estimate: activation bytes per token are itemised from transformers' Qwen3 layer with CUDA's
memory-efficient attention (see layer_activation_bytes); "one layer recomputed" counts its gradients as the
same size again; the CUDA context and NCCL buffers are a flat 1 GB. Everything else is exact arithmetic on the
shapes. The KV cache is the engine's, allocated once per rollout (engine.KVCache, nothing copied as it fills);
the training forward keeps only the last hidden state (models.hidden_states).
GB here are GiB (2^30 bytes). The last line printed is one JSON object with peak_gb per phase.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                # the project's modules first: bench/rollout.py is not rollout.py
sys.path.append(str(ROOT / "bench"))

import grpo  # noqa: E402
from shapes import QWEN3  # noqa: E402

PHASES = ("startup", "rollout", "logprob", "loss", "backward", "step")
GB = 2 ** 30
CONTEXT_GB = 1.0       # CUDA context, cuBLAS workspaces, NCCL buffers: outside torch's allocator, rough


@dataclass
class Shape:
    """What the plan needs to know about the model, read from its transformers config."""
    name: str
    source: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    params: int
    """all parameters, a tied lm_head counted once"""
    block_params: int
    """one decoder layer's parameters"""

    @property
    def root_params(self) -> int:
        """Outside the decoder layers: the embedding, the final norm and (untied) the lm_head: FSDP's root group."""
        return self.params - self.layers * self.block_params


def shape_from_config(config, name: str, source: str) -> Shape:
    """Count the parameters of config's model class, built on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())           # parameters() lists a tied weight once
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    return Shape(name=name, source=source, hidden=config.hidden_size, layers=config.num_hidden_layers,
                 heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                 head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                 intermediate=config.intermediate_size, vocab=config.vocab_size,
                 tied=bool(getattr(config, "tie_word_embeddings", False)), params=params, block_params=block)


def load_shape(model: str) -> Shape:
    """The shape of `model` (train.py's --model): "tiny" or "tiny-demo", a local folder, a hub id in the HF cache, or
    a table entry."""
    from transformers import AutoConfig, Qwen3Config

    if model in ("tiny", "tiny-demo"):
        import models
        return shape_from_config(models.load_model(model)[0].config, model, "models.load_model")
    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise SystemExit(f"--config: model folder {model} has no config.json")
        return shape_from_config(AutoConfig.from_pretrained(model), model, f"{model}/config.json")
    try:
        return shape_from_config(AutoConfig.from_pretrained(model, local_files_only=True), model,
                                 "config.json in the Hugging Face cache")
    except (OSError, ValueError):
        pass
    key = model.split("/")[-1]
    if key not in QWEN3:
        raise SystemExit(f"--config: model {model!r} is not a local folder, not in the Hugging Face cache, and not in "
                         f"bench/shapes.py's table (known: {', '.join(QWEN3)})")
    s = QWEN3[key]
    cfg = Qwen3Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      head_dim=s["head_dim"], tie_word_embeddings=s["tied"])
    return shape_from_config(cfg, model, f"bench/shapes.py table ({key}, from the hub's config.json)")


def layer_activation_bytes(s: Shape, masked: bool) -> int:
    """Bytes one decoder layer saves for its backward, per token, bf16 compute (transformers' Qwen3 layer, CUDA's
    memory-efficient attention). q = heads x head_dim, kv = kv_heads x head_dim, I = intermediate, H = hidden:
      2 RMSNorms (input, post-attention)  fp32 input + fp32 normalised + bf16 output  2 x 10H
      q_norm, k_norm (per head)           the same on q and k                          10q + 10kv
      attention (saves q, k, v, output, logsumexp); with a padding mask transformers repeats k and v to every
      query head first (repeat_kv), without one sdpa takes them as they are (enable_gqa)
                                          2q + 2 x 2(q or kv) + 2q + 4 heads
      o_proj input (a contiguous copy)    2q
      MLP: gate, up, silu(gate), product  4 x 2I
    """
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attn = 2 * q + 2 * 2 * (q if masked else kv) + 2 * q + 4 * s.heads
    return 20 * s.hidden + 10 * q + 10 * kv + attn + 2 * q + 8 * s.intermediate


@dataclass
class Item:
    name: str
    bytes: float
    phases: tuple
    """the phases it is held in; empty: shown for comparison, not counted"""


def plan(cfg, gpus: int, s: Shape, prompt_tokens: int = 1152) -> tuple[list[Item], dict]:
    """The memory items of `cfg` (train.Config) on `gpus` GPUs, and the figures they were computed from."""
    bf16 = cfg.dtype == "bfloat16"
    lo = 2 if bf16 else 4                       # bytes of the compute dtype (and of the rollout copy)
    shard = gpus if cfg.fsdp else 1
    P, Pb, Pr = s.params, s.block_params, s.root_params
    q = s.heads * s.head_dim
    T = prompt_tokens + cfg.rollout.max_episode_tokens               # the longest episode, prompt included
    tasks = math.ceil(cfg.batch_size / gpus)
    rows = min(cfg.rollout_tasks or tasks, tasks) * cfg.group_size  # episodes sharing one KV cache
    mb = cfg.micro_batch_size
    masked = mb > 1                             # right-padded micro-batches need a mask
    # FSDP2 with param_dtype bf16 runs the residual stream in bf16; autocast over fp32 weights keeps it fp32
    res = 2 if (bf16 and cfg.fsdp) else 4
    act_scale = 1 if (bf16 and cfg.fsdp) else 2
    kv_token = 2 * s.layers * s.kv_heads * s.head_dim * lo           # K and V of every layer, one token
    chunk = grpo.chunk_tokens(s.vocab, cfg.loss.chunk_mb, "cuda")
    loss_tokens = mb * cfg.rollout.max_episode_tokens                # agent tokens are at most the budget
    per_update = math.ceil(cfg.mini_batch_size / gpus) * cfg.group_size
    micro = math.ceil(per_update / mb)
    layer = mb * T * layer_activation_bytes(s, masked) * act_scale
    ALL, TRAIN = PHASES, ("loss", "backward")
    it = []

    def add(name, nbytes, phases):
        it.append(Item(name, float(nbytes), tuple(phases)))

    sh = f", sharded 1/{gpus}" if cfg.fsdp and gpus > 1 else ""
    copy_dtype = "bf16" if bf16 else "fp32"
    # --- held all the time (AdamW's moments from its first step on)
    add(f"master weights fp32{sh}", 4 * P / shard, ALL)
    add(f"AdamW moments fp32{sh}", 8 * P / shard, ALL[1:])
    add(f"gradients fp32{sh}", 4 * P / shard, ("loss", "backward", "step"))
    if bf16 or cfg.fsdp:
        add(f"rollout copy {copy_dtype}, full (rollout_copy)", lo * P, ALL)
    if cfg.loss.kl_coef > 0:
        add("reference model fp32, full (kl_coef > 0)", 4 * P, ALL[1:])
    add("CUDA context, workspaces, NCCL (rough)", CONTEXT_GB * GB, ALL)
    # --- start-up: loaded on the CPU; fully_shard moves one group at a time to the GPU (a block, then the root:
    # embeddings, final norm, lm_head), then keeps its shard
    if cfg.fsdp:
        add("fully_shard: largest group in full fp32", 4 * max(Pb, Pr), ("startup",))
    # --- rollout
    add(f"KV cache {copy_dtype}: {rows} x {T:,} tokens x {kv_token:,} B", rows * T * kv_token, ("rollout",))
    add("sampling: logits + fp32 softmax copies", rows * s.vocab * (lo + 16), ("rollout",))
    # --- training forward (logprob, loss) and backward
    if cfg.fsdp:
        add("FSDP2 unsharded params: root + 2 blocks", (Pr + 2 * Pb) * lo, ("logprob",) + TRAIN)
    elif bf16:
        add("autocast bf16 weight copies (saved)", 2 * P, TRAIN)
    if masked:
        add(f"attention mask, bool {mb} x {T:,}^2", mb * T * T, ("logprob",) + TRAIN)
    add("no-grad pass: one layer's working set", mb * T * (3 * s.intermediate + 3 * q) * lo, ("logprob",))
    add(f"log-prob tiles: 2 x {chunk:,} x {s.vocab:,} fp32", 2 * chunk * s.vocab * 4, ("logprob",))
    ckpt = s.layers * mb * T * s.hidden * res
    on = cfg.gradient_checkpointing
    add(f"checkpoints: each layer's input, {mb} x {T:,}" + ("" if on else " [off]"), ckpt, TRAIN if on else ())
    add("one layer recomputed + its gradients" + ("" if on else " [off]"), 2 * layer, ("backward",) if on else ())
    add("activations without checkpointing" + (" [off]" if on else ""), s.layers * layer, () if on else TRAIN)
    add(f"fused loss tiles: 2 fp32{' + bf16 d logits' if bf16 else ''}", chunk * s.vocab * (8 + (2 if bf16 else 0)),
        ("loss",))
    add("fused loss dW: fp32 buffer + its cast", s.vocab * s.hidden * (4 + lo), ("loss",))
    add(f"loss rows: hidden + gradient, {loss_tokens:,}", 2 * loss_tokens * s.hidden * lo, TRAIN)
    if cfg.fsdp:  # reduce-scattered after every micro-batch: no unsharded gradient outlives its block's backward
        add("FSDP2 reduce-scatter: one block + fp32", Pb * (lo + 4), ("backward",))
        add("FSDP2 root grads (lm_head/embed.) + fp32", Pr * (lo + 4), ("backward",))
    # data parallel all-reduces each gradient in place, and fused AdamW has no temporaries: nothing more at step
    host = 4 * P + (lo * P if bf16 or cfg.fsdp else 0)  # the fp32 model, and the rollout copy cast on the CPU
    facts = dict(params=P, tokens_per_episode=T, rollout_rows=rows, kv_bytes_per_token=kv_token, chunk_tokens=chunk,
                 micro_batches_per_update=micro, layer_activation_bytes_per_token=layer_activation_bytes(s, masked),
                 host_bytes_per_rank=host)
    return it, facts


def peaks(items: list[Item]) -> dict:
    """GB held at each phase's peak; update = the largest of loss, backward, step; total = the largest of all."""
    out = {p: sum(i.bytes for i in items if p in i.phases) / GB for p in PHASES}
    out["update"] = max(out["loss"], out["backward"], out["step"])
    out["total"] = max(out[p] for p in PHASES)
    return out


def disk_gb(cfg, gpus: int, s: Shape) -> dict:
    """Disk, from the shapes: one resumable checkpoint (checkpoints.save_checkpoint: fp32 weights and AdamW's two
    fp32 moments, a tied weight once) and the part of it each GPU's rank writes (its FSDP2 shard; under data
    parallel DCP deals the replicated tensors over the ranks); the --keep_last checkpoints kept; one Hugging Face
    export (export-N, final) in the training dtype."""
    ckpt = 12 * s.params
    saved = cfg.steps // cfg.save_every if cfg.save_every else 0
    return {"checkpoint": ckpt / GB, "checkpoint_per_gpu": ckpt / gpus / GB, "checkpoints_kept": ckpt / GB * min(
            saved, cfg.keep_last or saved), "export": (2 if cfg.dtype == "bfloat16" else 4) * s.params / GB}


def report(cfg, gpus: int, s: Shape, prompt_tokens: int, gpu_gb: float) -> dict:
    items, facts = plan(cfg, gpus, s, prompt_tokens)
    print(f"model {s.name}: {s.params / 1e9:.2f}B parameters, hidden {s.hidden:,}, {s.layers} layers, "
          f"{s.heads}/{s.kv_heads} heads x {s.head_dim}, MLP {s.intermediate:,}, vocab {s.vocab:,}, "
          f"{'tied' if s.tied else 'untied'} lm_head\n  (shape from {s.source})")
    print(f"run: {gpus} GPU(s), {'FSDP2' if cfg.fsdp else 'data parallel' if gpus > 1 else 'one process'}, "
          f"{cfg.dtype} compute, fp32 master weights, gradient checkpointing "
          f"{'on' if cfg.gradient_checkpointing else 'off'}\n"
          f"  rollout {facts['rollout_rows']} episodes at once x {facts['tokens_per_episode']:,} tokens "
          f"({prompt_tokens:,} prompt + {cfg.rollout.max_episode_tokens:,}); micro-batch {cfg.micro_batch_size} "
          f"({facts['micro_batches_per_update']} per update); loss chunk {facts['chunk_tokens']:,} tokens")
    width = max(len(i.name) for i in items)
    print(f"\n{'GB per GPU':<{width}}" + "".join(f"{p:>9}" for p in PHASES))
    for i in items:     # an item of no phase is shown for comparison: its size in the first column
        cells = "".join(f"{i.bytes / GB:>9.2f}" if p in i.phases else f"{'-':>9}" for p in PHASES)
        print(f"{i.name:<{width}}{cells}" if i.phases else f"{i.name:<{width}}{i.bytes / GB:>9.2f}  (not counted)")
    pk = peaks(items)
    print(f"{'peak':<{width}}" + "".join(f"{pk[p]:>9.2f}" for p in PHASES))
    worst = max(PHASES, key=lambda p: pk[p])
    fits = pk["total"] <= gpu_gb
    print(f"\npeak {pk['total']:.1f} GB in phase {worst}: {'fits' if fits else 'does NOT fit'} a {gpu_gb:g} GB GPU")
    host = facts["host_bytes_per_rank"] / GB
    print(f"host memory at start-up: each rank loads the model on the CPU ({host:.1f} GB with the rollout copy's "
          f"cast), {gpus} x {host:.1f} = {gpus * host:.0f} GB in all")
    disk = disk_gb(cfg, gpus, s)
    print(f"disk: a checkpoint {disk['checkpoint']:.2f} GB ({disk['checkpoint_per_gpu']:.2f} GB per GPU), "
          f"{disk['checkpoints_kept']:.1f} GB for those kept (--keep_last {cfg.keep_last}); an export "
          f"{disk['export']:.2f} GB ({cfg.dtype})")
    return {"config": None, "model": s.name, "gpus": gpus, "params_b": round(s.params / 1e9, 3),
            "peak_gb": {k: round(pk[k], 2) for k in ("startup", "rollout", "logprob", "update", "total")},
            "gpu_gb": gpu_gb, "fits": fits, "disk_gb": {k: round(v, 2) for k, v in disk.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a training config, e.g. configs/userrl-qwen3-4b.json")
    p.add_argument("--gpus", type=int, default=8, help="GPUs that train (ranks)")
    p.add_argument("--gpu-gb", type=float, default=80, help="memory of one GPU, to say whether the plan fits")
    p.add_argument("--prompt-tokens", type=int, default=1152,
                   help="the longest prompt (system + tools + opening); the original caps it at 1,152")
    p.add_argument("--quick", action="store_true", help="the same (the plan is arithmetic, already fast)")
    args = p.parse_args(argv)
    if args.gpus < 1:
        raise SystemExit(f"--gpus must be >= 1, got {args.gpus}")
    import train
    from config import ConfigError
    try:
        cfg = train.parse_config(["--config", args.config])
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    out = report(cfg, args.gpus, load_shape(cfg.model), args.prompt_tokens, args.gpu_gb)
    out["config"] = args.config
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
