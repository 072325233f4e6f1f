"""Reward design: per-turn rewards -> trajectory score -> group advantage -> per-token advantage.

UserRL (arXiv 2509.19736, section 3.2 "reward calculator") turns one trajectory's per-turn env rewards into
  1. a trajectory-level score S (one scalar), group-normalised over the rollouts of one prompt into the GRPO
     advantage A (the baseline is the group, no critic), and
  2. turn-level credits c_k, which only *redistribute* A over the agent's tokens, turn by turn.

    import rewards
    tok_adv, traj_adv = rewards.compute_advantages(turn_rewards, turn_lengths, group_ids,
                                                   score="sum", credit="equalized")   # the paper's default

Every idea is a small pure function registered by name in one of three dicts: SCORES (trajectory level),
CREDITS (turn level), SCHEMES (how credits and A become token advantages). A new idea is one function plus
one line, e.g. `CREDITS["last"] = credit_last`. Everything here works on plain Python lists of floats. A credit
function may also read the env's info of each turn (`turn_info`, rollout.Episode.turn_info: e.g. "error" for a
malformed tool call), when the caller passes it.

Departure from the original: a group with one member gets A = 0 (the original uses mean 0, std 1 there,
i.e. A = S); see `_normalise`.
"""
import math

# ----------------------------------------------------------------------------------------------------------
# Trajectory-level score S (one scalar per trajectory; ranks the rollouts of one group)


def score_sum(turn_rewards: list[float], gamma: float) -> float:
    """The paper's "Sum". The original code divides by the number of turns, so it is really the *mean* turn
    reward, rounded to 4 places: the same total reward earned in more turns scores lower."""
    if not turn_rewards:
        return 0.0
    return round(sum(turn_rewards) / len(turn_rewards), 4)


def score_r2g(turn_rewards: list[float], gamma: float) -> float:
    """Discounted return from the first turn, r_0 + g r_1 + g^2 r_2 + ...: earlier success scores higher."""
    return sum(gamma ** t * r for t, r in enumerate(turn_rewards))


SCORES = {"sum": score_sum, "r2g": score_r2g}

# ----------------------------------------------------------------------------------------------------------
# Turn-level credit c_k (one value per agent turn; only its relative size within a trajectory matters
# under the "userrl" scheme). Signature: fn(turn_rewards, gamma, turn_info=None), turn_info one dict per turn
# (None when the caller has none); train.py refuses a registered credit that takes other arguments.


def credit_equalized(turn_rewards: list[float], gamma: float, turn_info: list[dict] | None = None) -> list[float]:
    """1 for every turn: every agent token gets A, i.e. plain outcome GRPO."""
    return [1.0] * len(turn_rewards)


def credit_r2g(turn_rewards: list[float], gamma: float, turn_info: list[dict] | None = None) -> list[float]:
    """Reward-to-go per turn, c_k = sum_{j>=k} g^(j-k) r_j: a turn is credited with what followed it."""
    out, running = [], 0.0
    for r in reversed(turn_rewards):
        running = r + gamma * running
        out.append(running)
    return out[::-1]


def credit_em(turn_rewards: list[float], gamma: float, turn_info: list[dict] | None = None) -> list[float]:
    """Exponential mapping 0.5 + 0.5 (1 - e^(-2r)) / (1 - e^(-2)), rounded to 4 places as in the original:
    r in [0, 1] -> [0.5, 1], so a zero-reward turn keeps half weight and small rewards are pushed up."""
    return [round(0.5 + 0.5 * (1 - math.exp(-2 * r)) / (1 - math.exp(-2)), 4) for r in turn_rewards]


def credit_naive(turn_rewards: list[float], gamma: float, turn_info: list[dict] | None = None) -> list[float]:
    """The raw turn reward (not an option in the original code; added here as the simplest baseline)."""
    return [float(r) for r in turn_rewards]


CREDITS = {"equalized": credit_equalized, "r2g": credit_r2g, "em": credit_em, "naive": credit_naive}

# ----------------------------------------------------------------------------------------------------------
# The API other modules call


def _lookup(registry: dict, kind: str, name: str):
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def trajectory_score(turn_rewards: list[float], method: str = "sum", gamma: float = 0.8) -> float:
    """S for one trajectory (an empty trajectory scores 0)."""
    return _lookup(SCORES, "trajectory score", method)(list(turn_rewards), gamma)


def turn_credits(turn_rewards: list[float], method: str = "equalized", gamma: float = 0.8,
                 turn_info: list[dict] | None = None) -> list[float]:
    """c_k for each turn of one trajectory (turn_info, the env's info per turn, is passed on when given)."""
    fn = _lookup(CREDITS, "turn credit", method)
    return fn(list(turn_rewards), gamma, None if turn_info is None else list(turn_info))


def _normalise(values: list[float], use_std: bool) -> list[float]:
    """(v - mean) / (std + 1e-6) within one group, std unbiased as torch.std; mean-only when use_std is off.

    A group with one member or no spread gets 0: it carries no relative signal. The original gives a lone
    member mean 0 and std 1, i.e. A = S (an unbaselined REINFORCE step on the raw score); we deliberately do
    not, so a group that lost its siblings cannot push the policy with the raw reward scale.
    """
    n = len(values)
    if n < 2 or max(values) == min(values):
        return [0.0] * n
    mean = sum(values) / n
    if not use_std:
        return [v - mean for v in values]
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return [(v - mean) / (std + 1e-6) for v in values]


def _groups(group_ids: list) -> dict:
    """group id -> indices of its members, in order of first appearance."""
    groups = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return groups


def group_advantages(scores: list[float], group_ids: list, use_std: bool = True) -> list[float]:
    """GRPO advantage per trajectory: its score normalised within its group (rollouts of one prompt)."""
    if len(scores) != len(group_ids):
        raise ValueError(f"{len(scores)} scores but {len(group_ids)} group ids")
    out = [0.0] * len(scores)
    for members in _groups(group_ids).values():
        for i, a in zip(members, _normalise([scores[i] for i in members], use_std)):
            out[i] = a
    return out


def token_advantages(credits: list[float], turn_lengths: list[int], advantage: float) -> list[float]:
    """The original's redistribution, for one trajectory: every agent token of turn k gets c_k, then the
    tokens are rescaled so their mean over tokens with non-zero credit equals A:
        token_adv = c_k * A * n_nonzero / sum_k(c_k * turn_lengths[k]);   all zeros if that sum is 0.

    Consequences of this formula, reproduced on purpose (it is how the paper's models were trained):
    - With r2g or em credits and A < 0, the turns with the *highest* credit get the *most negative*
      advantage: in a below-average rollout the turn that earned the reward is punished hardest.
    - With r2g, a rollout whose rewards are all 0 has credit sum 0 and gets no gradient at all, even when
      A < 0, so failed rollouts send no negative signal; turns after the last reward get 0 too.
    - Credits that can be negative (naive, r2g with negative rewards) can flip the sign of the sum and
      with it the sign of every token's advantage.
    The "additive" scheme below avoids all three.
    """
    if len(credits) != len(turn_lengths):
        raise ValueError(f"{len(credits)} turn credits but {len(turn_lengths)} turn lengths")
    n_nonzero = sum(n for c, n in zip(credits, turn_lengths) if c != 0)
    total = sum(c * n for c, n in zip(credits, turn_lengths))
    if total == 0:
        return [0.0] * sum(turn_lengths)
    scale = advantage * n_nonzero / total
    return [c * scale for c, n in zip(credits, turn_lengths) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Schemes: credits + trajectory advantages -> token advantages, for a whole batch (some need the groups)


def scheme_userrl(credits, turn_lengths, traj_adv, group_ids, use_std, lam):
    """The original (see token_advantages). `lam` is unused."""
    return [token_advantages(c, n, a) for c, n, a in zip(credits, turn_lengths, traj_adv)]


def scheme_additive(credits, turn_lengths, traj_adv, group_ids, use_std, lam):
    """Turn advantage plus lam times trajectory advantage, both group-normalised:
        token_adv(turn k of rollout i) = norm_group(c_{i,k}) + lam * A_i,
    where norm_group pools every turn credit of every rollout in the group. A turn is judged against the
    group's other turns, so a high-credit turn is never pushed down for being high-credit, and a failed
    rollout still gets -lam*|A|. With equalized credits the turn term is 0 and this is plain GRPO (x lam).
    A group with one member gets 0, as in _normalise (its turns would otherwise be judged against each other
    alone); a group whose scores have no spread still gets its turn term, the signal this scheme adds.
    """
    turn_adv = [[0.0] * len(c) for c in credits]
    for members in _groups(group_ids).values():
        if len(members) < 2:
            continue
        pooled = _normalise([x for i in members for x in credits[i]], use_std)
        for i in members:
            turn_adv[i], pooled = pooled[:len(credits[i])], pooled[len(credits[i]):]
    return [[t + lam * a for t, n in zip(ta, ns) for _ in range(n)]
            for ta, ns, a in zip(turn_adv, turn_lengths, traj_adv)]


SCHEMES = {"userrl": scheme_userrl, "additive": scheme_additive}


def compute_advantages(turn_rewards: list[list[float]], turn_lengths: list[list[int]], group_ids: list,
                       score: str = "sum", credit: str = "equalized", scheme: str = "userrl",
                       gamma: float = 0.8, use_std: bool = True, lam: float = 1.0,
                       turn_info: list[list[dict]] | None = None) -> tuple[list[list[float]], list[float]]:
    """The trainer's one call, for a batch of trajectories (episode i: turn_rewards[i][k] is the env reward
    of agent turn k, turn_lengths[i][k] its number of agent tokens, group_ids[i] its prompt's group, and when
    given turn_info[i][k] the env's info of that turn, passed to the credit function).

    Returns (token advantages per episode, one value per agent token in order; trajectory advantage per
    episode). Defaults are the paper's recipe: Sum score, Equalized credit, gamma 0.8, std on.
    """
    score_fn = _lookup(SCORES, "trajectory score", score)
    credit_fn = _lookup(CREDITS, "turn credit", credit)
    scheme_fn = _lookup(SCHEMES, "advantage scheme", scheme)
    if not len(turn_rewards) == len(turn_lengths) == len(group_ids):
        raise ValueError(f"batch sizes differ: {len(turn_rewards)} reward lists, {len(turn_lengths)} "
                         f"turn-length lists, {len(group_ids)} group ids")
    if turn_info is not None and len(turn_info) != len(turn_rewards):
        raise ValueError(f"batch sizes differ: {len(turn_rewards)} reward lists, {len(turn_info)} turn_info lists")
    for i, (r, n) in enumerate(zip(turn_rewards, turn_lengths)):
        if len(r) != len(n):
            raise ValueError(f"episode {i}: {len(r)} turn rewards but {len(n)} turn lengths")
        if turn_info is not None and len(turn_info[i]) != len(r):
            raise ValueError(f"episode {i}: {len(r)} turn rewards but {len(turn_info[i])} turn_info entries")
        if any(not isinstance(k, int) or k < 0 for k in n):
            raise ValueError(f"episode {i}: turn lengths must be non-negative ints, got {n}")
    scores = [score_fn(list(r), gamma) for r in turn_rewards]
    traj_adv = group_advantages(scores, group_ids, use_std)
    credits = [credit_fn(list(r), gamma, None if turn_info is None else list(turn_info[i]))
               for i, r in enumerate(turn_rewards)]
    return scheme_fn(credits, turn_lengths, traj_adv, group_ids, use_std, lam), traj_adv


def zero_spread_fraction(values: list[float], group_ids: list) -> float:
    """Fraction of groups whose members all have the same value (pass trajectory scores or trajectory
    advantages: same answer). Such a group gives no learning signal; worth logging every step."""
    groups = _groups(group_ids)
    if not groups:
        return 0.0
    return sum(len({values[i] for i in m}) == 1 for m in groups.values()) / len(groups)
