"""rewards.py on small cases computed by hand (the numbers below are written out, not produced by the code)."""
import math

import pytest

import rewards

approx = pytest.approx


# ---- trajectory scores


def test_sum_score_is_the_mean_turn_reward_rounded_to_4_places():
    assert rewards.trajectory_score([0.0, 1.0, 0.5]) == 0.5          # 1.5 / 3
    assert rewards.trajectory_score([1.0, 0.0, 0.0]) == 0.3333       # 1/3 rounded
    assert rewards.trajectory_score([0.2]) == 0.2                    # 1-turn episode
    assert rewards.trajectory_score([0.0, 0.0]) == 0.0
    assert rewards.trajectory_score([]) == 0.0


def test_r2g_score_discounts_from_the_first_turn():
    assert rewards.trajectory_score([1.0, 0.0, 1.0], "r2g", gamma=0.5) == approx(1.0 + 0.25)
    assert rewards.trajectory_score([0.0, 1.0], "r2g") == approx(0.8)
    assert rewards.trajectory_score([0.7], "r2g") == approx(0.7)


# ---- turn credits


def test_equalized_and_naive_credits():
    assert rewards.turn_credits([0.0, 0.3, 1.0]) == [1.0, 1.0, 1.0]
    assert rewards.turn_credits([0.0, 0.3, 1.0], "naive") == [0.0, 0.3, 1.0]


def test_r2g_credit_is_reward_to_go_per_turn():
    # c2 = 1; c1 = 0 + 0.5*1 = 0.5; c0 = 0.2 + 0.5*0.5 = 0.45
    assert rewards.turn_credits([0.2, 0.0, 1.0], "r2g", gamma=0.5) == approx([0.45, 0.5, 1.0])
    assert rewards.turn_credits([0.0, 0.0], "r2g") == [0.0, 0.0]
    assert rewards.turn_credits([0.6], "r2g") == approx([0.6])


def test_em_credit_maps_0_to_half_and_1_to_one():
    # r = 0.5: 0.5 + 0.5 * (1 - e^-1) / (1 - e^-2) = 0.5 + 0.5 * 0.632121 / 0.864665 = 0.86553 -> 0.8655
    assert rewards.turn_credits([0.0, 0.5, 1.0], "em") == [0.5, 0.8655, 1.0]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: em, equalized, naive, r2g"):
        rewards.turn_credits([1.0], "bogus")
    with pytest.raises(ValueError, match="known: r2g, sum"):
        rewards.trajectory_score([1.0], "mean")
    with pytest.raises(ValueError, match="known: additive, userrl"):
        rewards.compute_advantages([[1.0]], [[1]], [0], scheme="nope")


# ---- group baseline


def test_group_advantages_unbiased_std_per_group():
    # group "a": scores 0, 1 -> mean 0.5, unbiased std sqrt(0.5) -> +-0.5/0.70711
    # group "b": 1, 2, 3 -> mean 2, std 1 -> -1, 0, 1 (each / (1 + 1e-6))
    adv = rewards.group_advantages([0.0, 1.0, 2.0, 1.0, 3.0], ["a", "a", "b", "b", "b"])
    s = math.sqrt(0.5) + 1e-6
    assert adv == approx([-0.5 / s, 0.5 / s, 0.0, -1 / (1 + 1e-6), 1 / (1 + 1e-6)])


def test_group_advantages_without_std_is_mean_only():
    assert rewards.group_advantages([0.0, 1.0, 5.0], [7, 7, 7], use_std=False) == approx([-2.0, -1.0, 3.0])


def test_single_member_and_zero_spread_groups_get_zero():
    # ties: 0.1 three times has a float mean != 0.1; still exactly 0, not 1e-11 / 1e-6
    adv = rewards.group_advantages([0.1, 0.1, 0.1, 0.9, 0.0, 0.0], [0, 0, 0, 1, 2, 2])
    assert adv == [0.0] * 6
    assert rewards.group_advantages([0.1, 0.1, 0.1], [0, 0, 0], use_std=False) == [0.0] * 3


# ---- token advantages (the original's redistribution)


def test_token_advantages_equalized_gives_every_token_A():
    assert rewards.token_advantages([1.0, 1.0], [2, 3], -0.7) == approx([-0.7] * 5)


def test_token_advantages_rescale_to_mean_A_over_nonzero_tokens():
    # credits 0, 0.5, 1 on 2, 2, 1 tokens: n_nonzero = 3, sum = 0*2 + 0.5*2 + 1*1 = 2, A = 2
    # -> turn 0: 0; turn 1: 0.5*2*3/2 = 1.5; turn 2: 1*2*3/2 = 3; mean over the 3 nonzero tokens = 2 = A
    assert rewards.token_advantages([0.0, 0.5, 1.0], [2, 2, 1], 2.0) == approx([0, 0, 1.5, 1.5, 3.0])


def test_token_advantages_negative_A_hits_the_highest_credit_hardest():
    # the documented consequence: r2g credits [0.5, 1] (1 token each), A = -1 -> n=2, sum=1.5
    # turn 0: 0.5*(-1)*2/1.5 = -2/3; turn 1: 1*(-1)*2/1.5 = -4/3 (the rewarded turn is punished most)
    assert rewards.token_advantages([0.5, 1.0], [1, 1], -1.0) == approx([-2 / 3, -4 / 3])


def test_token_advantages_zero_credit_sum_gives_zeros():
    assert rewards.token_advantages([0.0, 0.0], [3, 1], -1.5) == [0.0] * 4     # all-zero rewards under r2g
    assert rewards.token_advantages([], [], 1.0) == []
    with pytest.raises(ValueError, match="2 turn credits but 1 turn lengths"):
        rewards.token_advantages([1.0, 1.0], [3], 1.0)


# ---- the batch entry point


def test_compute_advantages_default_recipe():
    # one group of 2: scores (mean reward) 0.5 and 0 -> A = +-0.25/std, std = sqrt(0.125)
    tok, traj = rewards.compute_advantages([[0.0, 1.0], [0.0]], [[2, 1], [3]], ["p", "p"])
    a = 0.25 / (math.sqrt(0.125) + 1e-6)
    assert traj == approx([a, -a])
    assert tok == [approx([a] * 3), approx([-a] * 3)]


def test_compute_advantages_r2g_failed_rollout_sends_no_signal_under_userrl():
    # rollout 0 rewards [0, 1], rollout 1 rewards [0, 0]; r2g score: 0.8 vs 0 -> A = +-0.4/std,
    # std = sqrt(0.32); r2g credits: [0.8, 1] and [0, 0] -> rollout 1 gets all zeros despite A < 0
    tok, traj = rewards.compute_advantages([[0.0, 1.0], [0.0, 0.0]], [[1, 1], [2, 2]], [0, 0],
                                           score="r2g", credit="r2g")
    a = 0.4 / (math.sqrt(0.32) + 1e-6)
    assert traj == approx([a, -a])
    assert tok[0] == approx([0.8 * a * 2 / 1.8, 1.0 * a * 2 / 1.8])
    assert tok[1] == [0.0] * 4


def test_additive_scheme_normalises_turns_within_the_group():
    # same batch, scheme additive, lam 0.5: pooled r2g credits [0.8, 1, 0, 0]: mean 0.45,
    # deviations 0.35, 0.55, -0.45, -0.45 -> unbiased std sqrt((0.35^2 + 0.55^2 + 2*0.45^2)/3)
    tok, traj = rewards.compute_advantages([[0.0, 1.0], [0.0, 0.0]], [[1, 1], [2, 2]], [0, 0],
                                           score="r2g", credit="r2g", scheme="additive", lam=0.5)
    s = math.sqrt((0.35 ** 2 + 0.55 ** 2 + 2 * 0.45 ** 2) / 3) + 1e-6
    a = traj[0]
    assert tok[0] == approx([0.35 / s + 0.5 * a, 0.55 / s + 0.5 * a])
    assert tok[1] == approx([-0.45 / s - 0.5 * a] * 4)       # the failed rollout is now pushed down


def test_additive_with_equalized_credits_is_plain_grpo():
    batch = ([[0.0, 1.0], [0.5], [0.2, 0.2, 0.2]], [[2, 1], [4], [1, 1, 1]], ["x", "x", "x"])
    tok_u, traj_u = rewards.compute_advantages(*batch)
    tok_a, traj_a = rewards.compute_advantages(*batch, scheme="additive")
    assert traj_a == traj_u
    assert [approx(t) for t in tok_a] == tok_u


def test_single_member_group_and_one_turn_episodes_get_zero():
    tok, traj = rewards.compute_advantages([[1.0], [0.3]], [[4], [2]], ["a", "b"], credit="em")
    assert traj == [0.0, 0.0]
    assert tok == [[0.0] * 4, [0.0] * 2]
    # the additive scheme too: a lone member's turns are not judged against each other
    tok, traj = rewards.compute_advantages([[0.0, 1.0]], [[2, 2]], ["a"], credit="r2g", scheme="additive")
    assert traj == [0.0] and tok == [[0.0] * 4]


def test_compute_advantages_rejects_mismatched_input():
    with pytest.raises(ValueError, match="episode 1: 2 turn rewards but 1 turn lengths"):
        rewards.compute_advantages([[1.0], [0.0, 1.0]], [[1], [3]], [0, 0])
    with pytest.raises(ValueError, match="batch sizes differ"):
        rewards.compute_advantages([[1.0]], [[1]], [0, 0])
    with pytest.raises(ValueError, match="non-negative ints"):
        rewards.compute_advantages([[1.0]], [[-2]], [0])


def test_new_idea_is_one_function_and_one_line():
    def credit_last(turn_rewards, gamma, turn_info=None):  # the README's example
        return [0.0] * (len(turn_rewards) - 1) + [1.0]

    rewards.CREDITS["last"] = credit_last
    try:
        tok, _ = rewards.compute_advantages([[0.0, 1.0], [0.0, 0.0]], [[2, 1], [1, 1]], [0, 0], credit="last")
    finally:
        del rewards.CREDITS["last"]
    # A = +-0.25/(sqrt(0.125)+1e-6) (mean scores 0.5, 0); only the last turn's tokens carry it
    a = 0.25 / (math.sqrt(0.125) + 1e-6)
    assert tok == [approx([0, 0, a]), approx([0, -a])]


def test_a_credit_can_read_each_turns_env_info():
    # The README's example: no credit for a turn whose tool call the env could not parse (info has "error").
    def credit_wellformed(turn_rewards, gamma, turn_info=None):
        return [0.0 if "error" in info else 1.0 for info in turn_info or [{}] * len(turn_rewards)]

    rewards.CREDITS["wellformed"] = credit_wellformed
    try:
        info = [[{"error": "no JSON"}, {"choice": "answer"}], [{}, {}]]
        tok, _ = rewards.compute_advantages([[0.0, 1.0], [0.0, 0.0]], [[2, 1], [1, 1]], [0, 0], credit="wellformed",
                                            turn_info=info)
        assert rewards.turn_credits([0.0, 1.0], "wellformed", turn_info=info[0]) == [0.0, 1.0]
        assert rewards.turn_credits([0.0, 1.0], "wellformed") == [1.0, 1.0]  # no info given: none is read
    finally:
        del rewards.CREDITS["wellformed"]
    a = 0.25 / (math.sqrt(0.125) + 1e-6)  # as above: mean scores 0.5 and 0 in one group
    assert tok == [approx([0, 0, a]), approx([-a, -a])]  # the malformed turn's two tokens get nothing
    # The built-in credits take turn_info and ignore it.
    plain = rewards.compute_advantages([[0.0, 1.0], [0.0, 0.0]], [[2, 1], [1, 1]], [0, 0], credit="em")
    assert rewards.compute_advantages([[0.0, 1.0], [0.0, 0.0]], [[2, 1], [1, 1]], [0, 0], credit="em",
                                      turn_info=info) == plain
    with pytest.raises(ValueError, match="episode 1: 2 turn rewards but 1 turn_info entries"):
        rewards.compute_advantages([[0.0], [0.0, 1.0]], [[1], [1, 1]], [0, 0], turn_info=[[{}], [{}]])


def test_zero_spread_fraction():
    assert rewards.zero_spread_fraction([1.0, 1.0, 0.0, 1.0, 0.3], [0, 0, 1, 1, 2]) == approx(2 / 3)
    assert rewards.zero_spread_fraction([], []) == 0.0
