"""One GRPO update on a fixed global batch, in one process or under torchrun (tests/test_distributed.py).

    python tests/dist_update.py OUT.pt                                  # one process, the whole batch
    torchrun --nproc_per_node 2 tests/dist_update.py OUT.pt             # two ranks, tasks dealt round-robin
    torchrun --nproc_per_node 2 tests/dist_update.py OUT.pt --fsdp      # the same with FSDP2 sharding
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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


def main(out: str, fsdp: bool):
    cfg = train.parse_config(["--batch_size", str(TASKS), "--group_size", str(GROUP), "--mini_batch_size", "2",
                              "--micro_batch_size", "1", "--lr", "1e-3", "--ppo_epochs", "2", "--fsdp", str(fsdp)])
    rank, world, device = train.setup_distributed(cfg)
    model, tok = train.load_model("tiny", seed=0)
    if fsdp:
        train.shard(model, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    local_tasks = list(range(TASKS))[rank::world]
    eps = [fixed_episode(t, m, len(tok)) for t in local_tasks for m in range(GROUP)]
    task_of = [j for j in range(len(local_tasks)) for _ in range(GROUP)]
    turn_lens = [[sum(e.loss_mask[a:b]) for a, b in e.turn_spans] for e in eps]
    advs, _ = rewards.compute_advantages([e.turn_rewards for e in eps], turn_lens, task_of, credit="r2g")
    advs = [torch.tensor(a) for a in advs]
    old = [lp - 0.05 for lp in train.recompute_logprobs(model, eps, cfg, tok.pad_token_id, device)[0]]  # ratio != 1
    stats = train.update(model, optimizer, eps, task_of, advs, old, None, cfg, tok.pad_token_id, device, world)
    params = [(p.full_tensor() if fsdp else p).detach().clone() for p in model.parameters()]
    if rank == 0:
        torch.save({"params": params, "stats": stats}, out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--fsdp" in sys.argv[2:])
