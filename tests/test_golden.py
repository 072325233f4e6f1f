"""The golden step: one GRPO step of train.py on the tiny model, checked against an update computed here from the
definitions alone. The test writes out everything the trainer does after the rollout: scores and group advantages
(failed episodes left out), the old log-probs at the sampling temperature, the per-token clipped objective
(clip_low != clip_high, dual clip, k3 KL to the initial policy, the token mean over each mini-batch), plain autograd
for the gradient, the global-norm clip, and AdamW with decoupled weight decay, written by hand. Every
hyper-parameter is set away from its default, so each one that failed to reach the update would move the result.
"""
import math

import pytest
import torch

import envs
import train
import users
from test_train import CommaEnv, read_metrics, small_cfg


class SometimesDownEnv(CommaEnv):
    """The comma gym whose user fails on one reply in four (by the reply's length, so the same episodes fail
    whichever thread steps them): those episodes must leave the scores, the advantages and the update."""

    def step(self, text):
        if len(text) % 4 == 0:
            raise users.UserError("the user endpoint is down")
        return super().step(text)


CASES = {
    # use_std on, KL on, a dual clip that bites, the gradient norm clipped on every update, 2 epochs x 2 updates
    "std-kl-clip": ["--rollout.temperature", "0.7", "--loss.clip_low", "0.1", "--loss.clip_high", "0.3",
                    "--loss.dual_clip", "1.5", "--loss.kl_coef", "0.05", "--weight_decay", "0.1",
                    "--grad_clip", "0.05", "--ppo_epochs", "2", "--use_std", "true"],
    # Dr. GRPO's mean-only advantage, no KL, a hot sampler, one epoch, a clip too loose to act
    "mean-only": ["--rollout.temperature", "1.3", "--loss.clip_low", "0.25", "--loss.clip_high", "0.05",
                  "--loss.dual_clip", "0", "--weight_decay", "0.5", "--grad_clip", "1000", "--ppo_epochs", "1",
                  "--use_std", "false"],
}


# ----------------------------------------------------------------------------------------------------------
# The reference, from the definitions


def group_advantages(scores: list, groups: list, use_std: bool) -> list:
    """(s - mean) / (unbiased std + 1e-6) within each group, or s - mean; 0 for a group of one or no spread."""
    out = []
    for s, g in zip(scores, groups):
        members = [x for x, h in zip(scores, groups) if h == g]
        mean = sum(members) / len(members)
        if len(members) < 2 or max(members) == min(members):
            out.append(0.0)
        elif use_std:
            std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
            out.append((s - mean) / (std + 1e-6))
        else:
            out.append(s - mean)
    return out


def generated_logprobs(model, episode, temperature: float) -> torch.Tensor:
    """log p of each generated token (loss mask 1) from one plain forward over the episode, at `temperature`."""
    ids = torch.tensor(episode.ids)
    logits = model(input_ids=ids[None]).logits[0, :-1].float() / temperature
    logp = torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0]
    return logp[torch.tensor(episode.loss_mask[1:], dtype=torch.bool)]


def token_losses(logp, old, adv, ref, loss):
    """The per-token PPO-clip objective with dual clip and k3 KL, one branch at a time."""
    log_ratio = (logp - old).clamp(-20, 20)
    ratio = log_ratio.exp()
    out = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - loss.clip_low, 1 + loss.clip_high))
    if loss.dual_clip:
        out = torch.where(adv < 0, torch.minimum(out, -adv * loss.dual_clip), out)
    if loss.kl_coef:
        d = (ref - logp).clamp(-20, 20)
        out = out + loss.kl_coef * (d.exp() - d - 1)
    return out


class HandAdamW:
    """torch.optim.AdamW's update written out: decoupled decay p -= lr wd p, then the bias-corrected Adam step."""

    def __init__(self, params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            p.mul_(1 - self.lr * self.wd)
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            m_hat, v_hat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
            p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


def reference_step(cfg, episodes: list, groups: list) -> tuple[list, list]:
    """The step's update from the definitions: returns the parameters after it and each update's gradient norm."""
    model, _ = train.load_model("tiny", seed=cfg.seed)
    params = list(model.parameters())
    temperature = cfg.rollout.temperature
    with torch.no_grad():
        old = [generated_logprobs(model, e, temperature) for e in episodes]  # also the KL's reference policy
    scores = [round(sum(e.turn_rewards) / len(e.turn_rewards), 4) for e in episodes]
    advs = group_advantages(scores, groups, cfg.use_std)
    adam = HandAdamW(params, cfg.lr, cfg.weight_decay)
    norms = []
    for _ in range(cfg.ppo_epochs):
        for k in range(cfg.batch_size // cfg.mini_batch_size):
            members = [i for i, g in enumerate(groups) if g // cfg.mini_batch_size == k]
            n_tokens = sum(sum(episodes[i].loss_mask) for i in members)
            loss = 0.0
            for i in members:
                logp = generated_logprobs(model, episodes[i], temperature)
                adv = torch.full_like(logp, advs[i])  # equalized credit: every generated token gets A
                loss = loss + token_losses(logp, old[i], adv, old[i], cfg.loss).sum() / n_tokens
            grads = torch.autograd.grad(loss, params, allow_unused=True) if members else [None] * len(params)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
            coef = min(1.0, cfg.grad_clip / (norm + 1e-6))
            adam.step([g * coef for g in grads])
            norms.append(norm)
    return [p.detach() for p in params], norms


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_equals_the_update_written_out(tmp_path, monkeypatch, case):
    monkeypatch.setitem(envs.GYMS, "comma", SometimesDownEnv)
    rolled = []
    real = train.roll_out
    monkeypatch.setattr(train, "roll_out", lambda *a: rolled.append(real(*a)) or rolled[-1])
    cfg = small_cfg(tmp_path, "--steps", "1", "--batch_size", "2", "--group_size", "8", "--mini_batch_size", "1",
                    "--micro_batch_size", "3", "--rollout.max_new_tokens", "24", "--lr", "1e-2", "--save_every", "0",
                    "--seed", "0", *CASES[case])
    run_dir = train.train(cfg, task_pool={"comma": [{"id": f"d{i}"} for i in range(4)]})
    (episodes, _), = rolled
    kept = [j for j, e in enumerate(episodes) if not e.failed]
    groups = [j // cfg.group_size for j in kept]
    rewards = [sum(episodes[j].turn_rewards) for j in kept]
    # the batch exercises what it should: failures in both groups, a spread of rewards in both
    assert 0 < len(kept) < len(episodes) and sorted(set(groups)) == [0, 1]
    assert all(len({r for r, g in zip(rewards, groups) if g == k}) == 2 for k in (0, 1)), (rewards, groups)

    want, norms = reference_step(cfg, [episodes[j] for j in kept], groups)
    got = list(train.load_model(str(run_dir / "final"))[0].parameters())
    start = [p.detach() for p in train.load_model("tiny", seed=cfg.seed)[0].parameters()]
    assert max(float((w - s).abs().max()) for w, s in zip(want, start)) > 0.5 * cfg.lr  # not a no-op
    # Adam moves a parameter by up to ~lr per update. The trainer's batched, padded forward rounds differently from
    # this one's: most parameters agree to ~1e-5 lr, and the few whose gradient nearly cancels (so that Adam
    # divides rounding by rounding) by up to ~0.5% of lr. A bug moves far more of them.
    diff = torch.cat([(g.detach() - w).abs().flatten() for g, w in zip(got, want)])
    assert int((diff > 1e-3 * cfg.lr).sum()) <= 1e-3 * diff.numel() and float(diff.max()) < 5e-2 * cfg.lr, \
        (int((diff > 1e-3 * cfg.lr).sum()), float(diff.max()))

    m = read_metrics(run_dir)[0]
    assert m["grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    assert m["failed_episodes"] == len(episodes) - len(kept) and m["episodes"] == len(episodes)
    assert m["reward_mean"] == pytest.approx(sum(rewards) / len(rewards))  # failed episodes are not zeros
    assert m["clip_frac"] > 0  # the clip acts on some tokens
    if case == "std-kl-clip":
        assert min(norms) > cfg.grad_clip  # the clip acts on every update
