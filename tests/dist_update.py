"""One GRPO update on a fixed global batch of 4 tasks, in one process or under torchrun (tests/test_distributed.py):
with data parallel, then (under torchrun) on a fresh model with FSDP2. The tiny model has an untied lm_head, so
that a rank's padding forward leaves a parameter without a gradient.

    python tests/dist_update.py OUT.pt                       # one process, the whole batch
    torchrun --nproc_per_node 3 tests/dist_update.py OUT.pt  # 3 ranks: 2, 1 and 1 tasks, dealt round-robin
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import distributed  # noqa: E402
import models  # noqa: E402
import rewards  # noqa: E402
import train  # noqa: E402
from rollout import Episode  # noqa: E402

TASKS, GROUP = 4, 2


def fixed_episode(task: int, member: int, vocab: int) -> Episode:
    """A synthetic two-turn episode: a prompt, two agent turns, an observation between them."""
    g = torch.Generator().manual_seed(100 * task + member)
    prompt, turn1, obs, turn2 = (int(torch.randint(3, 9, (1,), generator=g)) for _ in range(4))
    n = prompt + turn1 + obs + turn2
    ids = torch.randint(10, vocab, (n,), generator=g).tolist()
    mask = [0] * prompt + [1] * turn1 + [0] * obs + [1] * turn2
    spans = [(prompt, prompt + turn1), (prompt + turn1 + obs, n)]
    rewards_ = [float(torch.rand(1, generator=g) > 0.5), float(torch.rand(1, generator=g))]
    return Episode(ids=ids, loss_mask=mask, logprobs=[0.0] * n, turn_rewards=rewards_, turn_spans=spans, gym="toy",
                   info={"end_reason": "done"})


def one_update(cfg, rank: int, world: int, fsdp: bool) -> dict:
    tok = models.build_tiny_tokenizer()
    model = models.build_tiny_model(tok, seed=0, tie_word_embeddings=False)
    if fsdp:
        distributed.shard(model, bf16=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    mine = distributed.deal(TASKS, rank, world)  # global task indices, as train.step deals them
    eps = [fixed_episode(t, m, len(tok)) for t in mine for m in range(GROUP)]
    task_of = [t for t in mine for _ in range(GROUP)]
    turn_lens = [[sum(e.loss_mask[a:b]) for a, b in e.turn_spans] for e in eps]
    advs, _ = rewards.compute_advantages([e.turn_rewards for e in eps], turn_lens, task_of, credit="r2g")
    batch = train.Batch(eps, task_of, [torch.tensor(a) for a in advs], tok.pad_token_id)
    batch.old_logprobs = [lp - 0.05 for lp in train.recompute_logprobs(model, batch, cfg)[0]]  # ratio != 1
    stats = train.update(model, optimizer, batch, cfg)
    return {"params": [distributed.full_tensor(p).detach().clone() for p in model.parameters()], "stats": stats}


def main(out: str):
    cfg = train.parse_config(["--batch_size", str(TASKS), "--group_size", str(GROUP), "--mini_batch_size", "2",
                              "--micro_batch_size", "1", "--lr", "1e-3", "--ppo_epochs", "2"])
    rank, world, device = distributed.setup(cfg.device, cfg.dist_timeout_min)
    result = {"ddp": one_update(cfg, rank, world, fsdp=False)}
    if world > 1:
        result["fsdp"] = one_update(cfg, rank, world, fsdp=True)
    if rank == 0:
        torch.save(result, out)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
