"""grpo.py: the chunked paths agree with log_softmax + gather, the loss matches a hand computation, and
gradients reach the decoder and the (tied) embedding exactly as plain autograd would send them."""
import math

import pytest
import torch

import grpo
import models

close = dict(atol=1e-5, rtol=1e-5)


def _cfg(chunk: int, vocab: int, **kw) -> grpo.LossConfig:
    """A LossConfig whose memory budget gives exactly `chunk` tokens per chunk."""
    return grpo.LossConfig(chunk_mb=chunk * 4 * vocab / 2 ** 20, **kw)


def _batch(n=37, h=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).squeeze(1)
    # old log-probs off by up to +-0.6 so every branch of the clip is taken somewhere
    old = logp + (torch.rand(n, generator=g) - 0.5) * 1.2
    adv = torch.randn(n, generator=g)
    ref = logp + (torch.rand(n, generator=g) - 0.5) * 0.4
    return hidden, weight, targets, old, adv, ref


def _grads(fn, hidden, weight, *args, **kw):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    out = fn(hidden, weight, *args, **kw)
    return out, hidden, weight


# ---- token_logprobs


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax_values_and_grads(chunk, temperature):
    hidden, weight, targets, *_ = _batch()
    g = torch.Generator().manual_seed(1)
    c_lp, c_ent = torch.randn(len(targets), generator=g), torch.randn(len(targets), generator=g)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp_all = torch.log_softmax((h1 @ w1.t()) / temperature, -1)
    ref_lp = logp_all.gather(1, targets[:, None]).squeeze(1)
    ref_ent = -(logp_all.exp() * logp_all).sum(1)
    (c_lp * ref_lp + c_ent * ref_ent).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = grpo.token_logprobs(h2, w2, targets, temperature, chunk_size=chunk, return_entropy=True)
    (c_lp * lp + c_ent * ent).sum().backward()

    torch.testing.assert_close(lp, ref_lp, **close)
    torch.testing.assert_close(ent, ref_ent, **close)
    torch.testing.assert_close(h2.grad, h1.grad, **close)
    torch.testing.assert_close(w2.grad, w1.grad, **close)


def test_token_logprobs_keeps_the_shape_of_targets_and_works_without_grad():
    hidden, weight, targets, *_ = _batch(n=12)
    with torch.no_grad():
        lp = grpo.token_logprobs(hidden.view(3, 4, -1), weight, targets.view(3, 4), chunk_size=5)
    assert lp.shape == (3, 4) and lp.dtype == torch.float32 and not lp.requires_grad
    expected = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).view(3, 4)
    torch.testing.assert_close(lp, expected, **close)


# ---- the loss, by hand


def test_loss_equals_a_hand_computation():
    # weight = I, so each hidden row is that token's logits. Four tokens, one per branch of the objective.
    hidden = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 1]], requires_grad=True)
    weight = torch.eye(3, requires_grad=True)
    targets = torch.tensor([0, 0, 0, 2])
    logp = [-math.log(3), 1 - math.log(math.e + 2), -math.log(2 + math.e ** 2), 1 - math.log(math.e + 2)]
    ratio = [1.0, 1.5, 0.5, 4.0]
    adv = [2.0, 1.0, -1.0, -0.5]
    old = torch.tensor([lp - math.log(r) for lp, r in zip(logp, ratio)])
    ref = torch.tensor([logp[0] + math.log(2)] + logp[1:])
    # token 0: ratio 1 -> -A r = -2;   k3 to ref: e^ln2 - ln2 - 1 = 1 - ln 2
    # token 1: A > 0, ratio 1.5 > 1.2 -> clipped: -1 * 1.2 = -1.2
    # token 2: A < 0, ratio 0.5 < 0.8 -> clipped: max(0.5, 0.8) = 0.8
    # token 3: A < 0, ratio 4 -> max(2, 0.6) = 2, dual clip caps it at 0.5 * 3 = 1.5
    expected = (-2 - 1.2 + 0.8 + 1.5 + 0.1 * (1 - math.log(2))) / 4
    cfg = grpo.LossConfig(kl_coef=0.1)
    w = grpo.loss_weights([4], "token-mean", n_tokens=4, n_seqs=1, norm_len=1)
    for fn in (grpo.grpo_loss, grpo.naive_grpo_loss):
        hidden.grad = weight.grad = None
        loss, stats = fn(hidden, weight, targets, old, torch.tensor(adv), w, cfg, ref_logprobs=ref)
        loss.backward()
        assert loss.item() == pytest.approx(expected, abs=1e-6)
        assert stats["clip_frac"].item() == pytest.approx(0.75)
        assert stats["kl"].item() == pytest.approx((1 - math.log(2)) / 4, abs=1e-6)
        # only token 0 has a gradient: w * (-A r + kl_coef (1 - e^d)) * (onehot - softmax) = 0.25 * -2.1 * ...
        # (the clip cuts tokens 1-3; their KL term is ~0 since ref = logp up to float rounding)
        g0 = 0.25 * (-2.0 + 0.1 * (1 - 2)) * torch.tensor([2 / 3, -1 / 3, -1 / 3])
        torch.testing.assert_close(hidden.grad[0], g0)
        torch.testing.assert_close(hidden.grad[1:], torch.zeros(3, 3), atol=1e-7, rtol=0)


def test_asymmetric_clip_k3_approx_kl_and_the_log_ratio_clamp_by_hand():
    """clip_low and clip_high each bound their own side, approx_kl is k3 = r - 1 - log r, and log-ratios are clamped
    to +-20 (no dual clip here, so a ratio of e^5 reaches the loss as it is)."""
    hidden = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 1]], requires_grad=True)
    weight = torch.eye(3, requires_grad=True)
    targets = torch.tensor([0, 0, 1, 2])
    logp = torch.log_softmax(hidden.detach(), -1).gather(1, targets[:, None])[:, 0]
    log_ratio = torch.tensor([math.log(1.25), math.log(0.85), 5.0, -30.0])
    adv = torch.tensor([1.0, -1.0, -2.0, 1.0])
    # token 0: A > 0, r = 1.25 inside (1 - 0.1, 1 + 0.3): -A r = -1.25, not clipped (a swapped clip cuts it at 1.1)
    # token 1: A < 0, r = 0.85 under 1 - 0.1: max(0.85, 0.9) = 0.9, clipped (a swapped clip lets 0.85 through)
    # token 2: A < 0, r = e^5: -A r = 2 e^5, no dual clip to cap it
    # token 3: A > 0, log r = -30 clamped to -20: -e^-20; its k3 is e^-20 - 1 + 20 (29 without the clamp)
    expected = (-1.25 + 0.9 + 2 * math.exp(5) - math.exp(-20)) / 4
    k3 = [1.25 - 1 - math.log(1.25), 0.85 - 1 - math.log(0.85), math.exp(5) - 6, math.exp(-20) + 19]
    cfg = grpo.LossConfig(clip_low=0.1, clip_high=0.3, dual_clip=0)
    w = torch.full((4,), 0.25)
    for fn in (grpo.grpo_loss, grpo.naive_grpo_loss):
        hidden.grad = weight.grad = None
        loss, stats = fn(hidden, weight, targets, logp - log_ratio, adv, w, cfg)
        loss.backward()
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 4, rel=1e-6)
        assert stats["clip_frac"].item() == 0.25
        # token 0's gradient is w (-A r) (onehot - softmax); the clip leaves token 1 none
        p0 = torch.softmax(hidden.detach()[0], -1)
        torch.testing.assert_close(hidden.grad[0], 0.25 * -1.25 * (torch.tensor([1.0, 0, 0]) - p0))
        assert hidden.grad[1].abs().max() == 0
    info = grpo.policy_loss(torch.zeros(2), torch.tensor([-30.0, 30.0]), torch.tensor([-1.0, 1.0]), cfg)[1]
    assert info["approx_kl"].tolist() == pytest.approx([math.exp(20) - 21, math.exp(-20) + 19], rel=1e-6)
    # The KL penalty's k3 is bounded by 10, as verl's low_var_kl: a token 15 nats below the reference would
    # add kl_coef x 3.3e6 (3,269 at kl_coef 1e-3), and past the bound it has no gradient.
    logp = torch.tensor([-16.0, -1.2], requires_grad=True)
    loss, info = grpo.policy_loss(logp, logp.detach(), torch.zeros(2), grpo.LossConfig(kl_coef=1e-3),
                                  ref_logprobs=torch.tensor([-1.0, -1.0]))
    assert info["kl"].tolist() == pytest.approx([10.0, math.exp(0.2) - 1.2], rel=1e-4)  # fp32 cancellation
    loss.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[1] != 0


# ---- fused training path vs naive


@pytest.mark.parametrize("chunk", [1, 7, 37, 64])
@pytest.mark.parametrize("temperature,kl_coef,dual_clip", [(1.0, 0.0, 3.0), (0.6, 0.05, 0.0)])
def test_fused_loss_matches_naive_values_and_grads(chunk, temperature, kl_coef, dual_clip):
    hidden, weight, targets, old, adv, ref = _batch()
    cfg = _cfg(chunk, weight.shape[0], temperature=temperature, kl_coef=kl_coef, dual_clip=dual_clip)
    w = grpo.loss_weights([20, 17], "seq-mean-token-mean", n_tokens=37, n_seqs=2, norm_len=1)
    out = {}
    for fn in (grpo.naive_grpo_loss, grpo.grpo_loss):
        (loss, stats), h, wt = _grads(fn, hidden, weight, targets, old, adv, w, cfg, ref_logprobs=ref)
        loss.backward()
        out[fn] = loss, stats, h.grad, wt.grad
    (l1, s1, gh1, gw1), (l2, s2, gh2, gw2) = out.values()
    assert 0 < s1["clip_frac"] < 1          # the batch exercises both clipped and unclipped tokens
    torch.testing.assert_close(l2, l1, **close)
    for k in grpo.STATS:
        torch.testing.assert_close(s2[k], s1[k], **close)
    torch.testing.assert_close(gh2, gh1, **close)
    torch.testing.assert_close(gw2, gw1, **close)


def test_backward_scales_by_the_incoming_gradient():
    hidden, weight, targets, old, adv, _ = _batch()
    w = torch.full((37,), 1 / 37)
    cfg = _cfg(10, weight.shape[0])
    grads = []
    for scale in (1.0, -3.0):
        (loss, _), h, wt = _grads(grpo.grpo_loss, hidden, weight, targets, old, adv, w, cfg)
        (scale * loss).backward()
        grads.append((h.grad, wt.grad))
    torch.testing.assert_close(grads[1][0], -3 * grads[0][0])
    torch.testing.assert_close(grads[1][1], -3 * grads[0][1])


@pytest.mark.parametrize("tied", [True, False])
def test_grads_through_the_tiny_model_match_naive(tiny, tied):
    """hidden comes from the decoder; weight is the lm_head, which is also the input embedding when tied:
    every parameter's gradient must equal plain autograd's, and masked positions get exactly zero."""
    _, tok = tiny
    model = models.build_tiny_model(tok, seed=0, tie_word_embeddings=tied).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    mask = torch.rand(2, 11, generator=g) < 0.6          # loss mask over predicted positions 1..11
    n = int(mask.sum())
    old = torch.randn(n, generator=g) * 0.3 - 7.0
    adv = torch.randn(n, generator=g)
    cfg = _cfg(5, model.config.vocab_size, temperature=0.8)
    w = torch.full((n,), 1.0 / n)
    grads = {}
    for fn in (grpo.naive_grpo_loss, grpo.grpo_loss):
        model.zero_grad(set_to_none=True)
        hidden_all = model.model(ids).last_hidden_state          # (B, T, H)
        hidden_all.retain_grad()
        hidden = hidden_all[:, :-1][mask]                        # loss-mask positions only, before lm_head
        loss, _ = fn(hidden, model.lm_head.weight, ids[:, 1:][mask], old, adv, w, cfg)
        loss.backward()
        grads[fn] = {k: p.grad.clone() for k, p in model.named_parameters()}
        masked_out = torch.cat([hidden_all.grad[:, :-1][~mask], hidden_all.grad[:, -1]])
        assert (masked_out == 0).all() and hidden_all.grad[:, :-1][mask].abs().sum() > 0
    for k, v in grads[grpo.naive_grpo_loss].items():
        torch.testing.assert_close(grads[grpo.grpo_loss][k], v, **close, msg=k)


def test_micro_batches_and_ranks_accumulate_to_the_full_batch_gradient():
    hidden, weight, targets, old, adv, _ = _batch(n=30)
    lens = [4, 9, 6, 11]                    # 4 sequences; micro-batch A = seqs 0-1 (13 tokens), B = seqs 2-3
    cfg = _cfg(6, weight.shape[0])
    for mode in grpo.AGG_MODES:
        full_w = grpo.loss_weights(lens, mode, n_tokens=30, n_seqs=4, norm_len=16)
        (loss, _), h, wt = _grads(grpo.grpo_loss, hidden, weight, targets, old, adv, full_w, cfg)
        loss.backward()
        h_acc, w_acc = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        total = 0.0
        for seqs, rows in (([4, 9], slice(0, 13)), ([6, 11], slice(13, 30))):
            mw = grpo.loss_weights(seqs, mode, n_tokens=30, n_seqs=4, norm_len=16)
            part, _ = grpo.grpo_loss(h_acc[rows], w_acc, targets[rows], old[rows], adv[rows], mw, cfg)
            part.backward()
            total += part.item()
        assert total == pytest.approx(loss.item(), abs=1e-6), mode
        torch.testing.assert_close(h_acc.grad, h.grad, **close)
        torch.testing.assert_close(w_acc.grad, wt.grad, **close)


def test_loss_weights_by_hand():
    assert grpo.loss_weights([2, 1], "token-mean", n_tokens=8, n_seqs=3, norm_len=4).tolist() == [0.125] * 3
    w = grpo.loss_weights([2, 1], "seq-mean-token-mean", n_tokens=8, n_seqs=4, norm_len=4)
    torch.testing.assert_close(w, torch.tensor([1 / 8, 1 / 8, 1 / 4]))
    w = grpo.loss_weights([2, 1], "seq-mean-token-sum-norm", n_tokens=8, n_seqs=4, norm_len=5)
    torch.testing.assert_close(w, torch.full((3,), 1 / 20))
    with pytest.raises(ValueError, match="known: token-mean"):
        grpo.loss_weights([2], "mean", 2, 1, 1)
    with pytest.raises(ValueError, match="n_tokens"):
        grpo.loss_weights([2, 3], "token-mean", n_tokens=4, n_seqs=2, norm_len=1)


def test_bf16_inputs_give_bf16_grads_close_to_fp32():
    hidden, weight, targets, old, adv, _ = _batch(n=40, h=32, v=300)
    w = torch.full((40,), 1 / 40)
    cfg = _cfg(16, 300)
    (l32, _), h32, w32 = _grads(grpo.grpo_loss, hidden, weight, targets, old, adv, w, cfg)
    l32.backward()
    (l16, _), h16, w16 = _grads(grpo.grpo_loss, hidden.bfloat16(), weight.bfloat16(), targets, old, adv, w, cfg)
    l16.backward()
    assert l16.dtype == torch.float32 and h16.grad.dtype == w16.grad.dtype == torch.bfloat16
    # bf16 logits carry ~3 significant digits; the loss and gradients must stay within that
    assert l16.item() == pytest.approx(l32.item(), abs=0.02)
    for a, b in ((h16.grad, h32.grad), (w16.grad, w32.grad)):
        assert (a.float() - b).norm() / b.norm() < 0.05


def test_chunk_budget_by_device():
    assert grpo.LossConfig().chunk_mb == 0                         # auto
    assert grpo.chunk_tokens(151_936, 0) == grpo.chunk_tokens(151_936, 0, "cpu") == 165
    assert grpo.chunk_tokens(151_936, 0, torch.device("cuda", 3)) == 1766
    assert grpo.chunk_tokens(151_936, 48, "cuda") == 82             # an explicit budget wins on any device
    assert grpo.chunk_tokens(10 ** 9, 1) == 1


def test_bad_input_is_named():
    hidden, weight, targets, old, adv, _ = _batch(n=5)
    w = torch.ones(5)
    cfg = grpo.LossConfig()
    with pytest.raises(ValueError, match=r"advantages must have shape \(5,\)"):
        grpo.grpo_loss(hidden, weight, targets, old, adv[:4], w, cfg)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 50\)"):
        grpo.token_logprobs(hidden, weight, targets + 50)
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logprobs"):
        grpo.grpo_loss(hidden, weight, targets, old, adv, w, grpo.LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="agg: unknown mode"):
        grpo.LossConfig(agg="sum")
    with pytest.raises(ValueError, match="dual_clip"):
        grpo.LossConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match=r"chunk_mb must be >= 0 \(0 = by device\)"):
        grpo.LossConfig(chunk_mb=-1)


# ---- fp32-output matmuls (CUDA), exercised on the CPU through stand-in kernels


def _mm_dtype_out(a, b, out_dtype, *, out):
    return out.copy_(a.to(out_dtype) @ b.to(out_dtype))


def _addmm_dtype_out(c, a, b, out_dtype, *, beta=1, alpha=1, out):
    return out.copy_(beta * c.to(out_dtype) + alpha * (a.to(out_dtype) @ b.to(out_dtype)))


def _addmm_rounding_c(c, a, b, out_dtype, *, beta=1, alpha=1, out):   # a kernel that rounds the buffer to bf16
    return out.copy_(beta * c.to(a.dtype).to(out_dtype) + alpha * (a.to(out_dtype) @ b.to(out_dtype)))


def _fused_bf16(hidden, weight, targets, old, adv, w, cfg):
    (loss, _), h, wt = _grads(grpo.grpo_loss, hidden.bfloat16(), weight.bfloat16(), targets, old, adv, w, cfg)
    loss.backward()
    return loss, h.grad, wt.grad


def test_fp32_output_matmuls_are_used_where_the_backend_has_them():
    """torch 2.13 has fp32-output kernels for bf16 matmuls on CUDA only. Registering CPU stand-ins for those two
    kernels (for this test only) shows that grpo takes them when they exist: the logits are no longer rounded
    to bf16, and the loss and gradients still match the reference."""
    from torch.library import _scoped_library

    hidden, weight, targets, old, adv, _ = _batch(n=40, h=32, v=300)
    weight = weight * 8                                   # logits of a few units: bf16 rounding shows in the loss
    w = torch.full((40,), 1 / 40)
    cfg = _cfg(16, 300)
    # the reference: fp32 everywhere on the bf16-rounded inputs, so only the handling of the products differs
    (ref, _), h32, w32 = _grads(grpo.naive_grpo_loss, hidden.bfloat16().float(), weight.bfloat16().float(),
                                targets, old, adv, w, cfg)
    ref.backward()
    grpo.fp32_out_matmuls.cache_clear()
    try:
        assert grpo.fp32_out_matmuls("cpu") == {"mm": False, "addmm": False}
        slow = _fused_bf16(hidden, weight, targets, old, adv, w, cfg)
        with _scoped_library("aten", "IMPL") as lib:
            lib.impl("mm.dtype_out", _mm_dtype_out, "CPU")
            lib.impl("addmm.dtype_out", _addmm_rounding_c, "CPU")
            grpo.fp32_out_matmuls.cache_clear()
            assert grpo.fp32_out_matmuls("cpu") == {"mm": True, "addmm": False}   # the buffer check catches it
        with _scoped_library("aten", "IMPL") as lib:
            lib.impl("mm.dtype_out", _mm_dtype_out, "CPU")
            lib.impl("addmm.dtype_out", _addmm_dtype_out, "CPU")
            grpo.fp32_out_matmuls.cache_clear()
            assert grpo.fp32_out_matmuls("cpu") == {"mm": True, "addmm": True}
            h, wt = hidden[:5].bfloat16(), weight.bfloat16()
            z = torch.empty(5, 300)
            grpo._logits(z, h, wt)
            torch.testing.assert_close(z, h.float() @ wt.float().t(), atol=1e-5, rtol=1e-5)   # not rounded
            fast = _fused_bf16(hidden, weight, targets, old, adv, w, cfg)
    finally:
        grpo.fp32_out_matmuls.cache_clear()
    # measured: rounding the logits moves the loss by 8e-4 and the gradients by 2% (relative norm); with fp32
    # logits the loss is off by 3e-8 and the gradients by 0.2% (their own bf16 rounding)
    assert abs(slow[0].item() - ref.item()) > 10 * abs(fast[0].item() - ref.item())
    assert abs(fast[0].item() - ref.item()) < 1e-5
    for got, want in ((fast[1], h32.grad), (fast[2], w32.grad)):
        assert got.dtype == torch.bfloat16 and (got.float() - want).norm() / want.norm() < 0.005
