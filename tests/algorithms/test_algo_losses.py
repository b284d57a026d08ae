"""PPO actor/critic losses, reward/cost model losses, DPO and SFT, against hand-derived values."""

import math

import pytest
import torch

from saferlhf.algorithms import (
    cost_model_loss,
    divergence_mask,
    dpo_loss,
    gather_logprobs,
    policy_loss,
    reward_model_loss,
    sequence_logprob_sums,
    sft_loss,
    value_loss,
)

F64 = torch.float64
NAN = float("nan")


def t64(values):
    return torch.tensor(values, dtype=F64)


def neg_log_sigmoid(x: float) -> float:
    """-log σ(x) = log(1 + e^{-x})."""
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------------------------------------- actor

# ε = 0.2. Hand-picked ratios and advantages, one token each:
#   ρ = 1.5, A = +1: min(1.5, 1.2)   =  1.2   clipped   (gradient 0)
#   ρ = 1.5, A = -1: min(-1.5, -1.2) = -1.5   unclipped
#   ρ = 0.5, A = +1: min(0.5, 0.8)   =  0.5   unclipped
#   ρ = 0.5, A = -1: min(-0.5, -0.8) = -0.8   clipped   (gradient 0)
#   ρ = 1.1, A = +2: inside the range = 2.2
# loss = -(1.2 - 1.5 + 0.5 - 0.8 + 2.2) / 5 = -0.32; clip fraction 2/5.
# ∂loss/∂logp_t = -(1/5)·ρ_t·A_t on unclipped tokens: [0, 0.3, -0.1, 0, -0.44].
RATIOS = [1.5, 1.5, 0.5, 0.5, 1.1]
ADVANTAGES = [1.0, -1.0, 1.0, -1.0, 2.0]


def test_policy_loss_clipping_by_hand():
    logp_old = t64([[-1.0] * 5])
    logp = (logp_old + t64([RATIOS]).log()).requires_grad_(True)
    out = policy_loss(logp, logp_old, t64([ADVANTAGES]), torch.ones(1, 5), clip_ratio=0.2)
    torch.testing.assert_close(out.loss, t64(-0.32))
    torch.testing.assert_close(out.clip_fraction, t64(0.4))
    approx_kl = sum(r - 1 - math.log(r) for r in RATIOS) / 5
    torch.testing.assert_close(out.approx_kl, t64(approx_kl))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, t64([[0.0, 0.3, -0.1, 0.0, -0.44]]))
    assert not out.clip_fraction.requires_grad and not out.approx_kl.requires_grad


def test_policy_loss_is_a_mean_per_sequence_and_skips_empty_rows():
    # ρ = 1: row 0 has A = [1, 1, 1], row 1 has A = [4] and padding, row 2 is empty.
    # loss = -mean(1, 4) = -2.5 (a token mean would give -7/4).
    logp = torch.zeros(3, 3, dtype=F64)
    advantages = t64([[1.0, 1.0, 1.0], [4.0, NAN, NAN], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    out = policy_loss(logp, logp, advantages, mask, clip_ratio=0.2)
    torch.testing.assert_close(out.loss, t64(-2.5))
    assert out.clip_fraction.item() == 0.0 and out.approx_kl.item() == 0.0


def test_policy_loss_ignores_garbage_on_padding_in_value_and_gradient():
    logp = t64([[-1.0, float("-inf"), NAN]]).requires_grad_(True)
    logp_old = t64([[-1.0, 0.0, float("inf")]])
    out = policy_loss(logp, logp_old, t64([[2.0, NAN, float("inf")]]), torch.tensor([[1, 0, 0]]), 0.2)
    out.loss.backward()
    torch.testing.assert_close(out.loss, t64(-2.0))
    torch.testing.assert_close(logp.grad, t64([[-2.0, 0.0, 0.0]]))


def test_policy_loss_treats_advantages_and_old_logprobs_as_constants():
    advantages = t64([[1.0, -2.0]]).requires_grad_(True)
    logp_old = t64([[-1.0, -2.0]]).requires_grad_(True)
    logp = t64([[-0.9, -2.1]]).requires_grad_(True)
    policy_loss(logp, logp_old, advantages, torch.ones(1, 2), 0.2).loss.backward()
    assert advantages.grad is None and logp_old.grad is None and logp.grad is not None


# --------------------------------------------------------------------------------------------- critic

# clip_value = 0.5, V_old = 0, G = 1:
#   V =  0.2: clip(V) =  0.2: (0.8)², (0.8)²  → 0.64
#   V =  2.0: clip(V) =  0.5: 1,      0.25    → 1      (unclipped term larger)
#   V = -1.0: clip(V) = -0.5: 4,      2.25    → 4
#   V =  1.2: clip(V) =  0.5: 0.04,   0.25    → 0.25   (clipped term larger: gradient 0)
# loss = 0.5·(0.64 + 1 + 4 + 0.25)/4 = 0.73625; clip fraction 1/4.
# ∂loss/∂V = (1/8)·2(V - G) where the unclipped term wins: [-0.2, 0.25, -0.5, 0].


def test_value_loss_clipping_by_hand():
    values = t64([[0.2, 2.0, -1.0, 1.2]]).requires_grad_(True)
    out = value_loss(values, torch.zeros(1, 4, dtype=F64), torch.ones(1, 4, dtype=F64), torch.ones(1, 4), 0.5)
    torch.testing.assert_close(out.loss, t64(0.73625))
    torch.testing.assert_close(out.clip_fraction, t64(0.25))
    out.loss.backward()
    torch.testing.assert_close(values.grad, t64([[-0.2, 0.25, -0.5, 0.0]]))


def test_value_loss_is_a_mean_per_sequence_and_ignores_padding():
    # Row 0: errors (1 - 0)² = 1 on two tokens; row 1: (3 - 0)² = 9 on one token, garbage after it;
    # row 2 empty. loss = 0.5·mean(1, 9) = 2.5.
    values = t64([[1.0, 1.0], [3.0, NAN], [NAN, NAN]]).requires_grad_(True)
    zeros = torch.zeros(3, 2, dtype=F64)
    out = value_loss(values, values.detach(), zeros, torch.tensor([[1, 1], [1, 0], [0, 0]]), clip_value=5.0)
    out.loss.backward()
    torch.testing.assert_close(out.loss, t64(2.5))
    assert torch.isfinite(values.grad).all()


# ----------------------------------------------------------------------------------- preference models


def test_reward_model_loss_by_hand():
    # One pair: r_w = 2, r_l = 1: -log σ(1) + 0.001·(4 + 1)/2.
    out = reward_model_loss(t64([2.0]), t64([1.0]), reg=0.001)
    torch.testing.assert_close(out.loss, t64(neg_log_sigmoid(1.0) + 0.0025))
    assert out.accuracy.item() == 1.0
    # Two pairs: (3, 1) right, (1, 1) a tie counts as wrong.
    # loss = (-log σ(2) - log σ(0))/2 + 0.001·((9 + 1) + (1 + 1))/2/2
    out = reward_model_loss(t64([3.0, 1.0]), t64([1.0, 1.0]), reg=0.001)
    torch.testing.assert_close(out.loss, t64((neg_log_sigmoid(2.0) + math.log(2.0)) / 2 + 0.001 * 12 / 4))
    assert out.accuracy.item() == 0.5


def test_reward_model_loss_is_stable_for_large_gaps():
    assert reward_model_loss(t64([1000.0]), t64([-1000.0]), reg=0.0).loss.item() == 0.0
    assert reward_model_loss(t64([-1000.0]), t64([1000.0]), reg=0.0).loss.item() == 2000.0
    assert reward_model_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]), reg=0.0).loss.item() == 2000.0


@pytest.mark.parametrize("safer_safe", [True, False])
@pytest.mark.parametrize("unsafer_safe", [True, False])
def test_cost_model_loss_by_hand(safer_safe, unsafer_safe):
    # c_l = -1 (safer), c_h = 2 (less safe); s = +1 safe / -1 unsafe.
    # pair term -log σ(c_h - c_l) = -log σ(3); label terms -log σ(-s_h·2) and -log σ(-s_l·(-1)).
    s_l, s_h = (1.0 if safer_safe else -1.0), (1.0 if unsafer_safe else -1.0)
    expected = neg_log_sigmoid(3.0) + neg_log_sigmoid(-s_h * 2.0) + neg_log_sigmoid(s_l * 1.0)
    expected += 0.001 * (4.0 + 1.0) / 2
    # sign accuracy: c_l < 0 is right iff the safer one is safe; c_h > 0 iff the less safe one is unsafe.
    expected_sign_accuracy = (float(safer_safe) + float(not unsafer_safe)) / 2
    for labels in [(torch.tensor([safer_safe]), torch.tensor([unsafer_safe])), (t64([s_l]), t64([s_h]))]:
        out = cost_model_loss(t64([-1.0]), t64([2.0]), *labels, reg=0.001)
        torch.testing.assert_close(out.loss, t64(expected))
        assert out.accuracy.item() == 1.0
        assert out.sign_accuracy.item() == expected_sign_accuracy


def test_cost_model_loss_batch_metrics():
    # Pair 0 ordered right (c_h = 1 > c_l = -2), pair 1 wrong (c_h = -1 < c_l = 0.5).
    # Labels: pair 0 (safe, unsafe), pair 1 (unsafe, unsafe).
    # Signs right: c=-2 safe ✓, c=1 unsafe ✓, c=0.5 unsafe ✓, c=-1 unsafe ✗ → 3/4.
    safer, unsafer = t64([-2.0, 0.5]), t64([1.0, -1.0])
    out = cost_model_loss(safer, unsafer, torch.tensor([True, False]), torch.tensor([False, False]), reg=0.0)
    pair0 = neg_log_sigmoid(3.0) + neg_log_sigmoid(1.0) + neg_log_sigmoid(2.0)
    pair1 = neg_log_sigmoid(-1.5) + neg_log_sigmoid(-1.0) + neg_log_sigmoid(0.5)
    torch.testing.assert_close(out.loss, t64((pair0 + pair1) / 2))
    assert out.accuracy.item() == 0.5
    assert out.sign_accuracy.item() == 0.75


def test_cost_model_sign_accuracy_counts_zero_as_wrong():
    out = cost_model_loss(t64([0.0]), t64([0.0]), torch.tensor([True]), torch.tensor([False]))
    assert out.sign_accuracy.item() == 0.0 and out.accuracy.item() == 0.0


# ------------------------------------------------------------------------------------------- gradients


def test_gradcheck_of_every_differentiable_loss():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    logp_old = -torch.rand(2, 4, dtype=F64)
    logp = (logp_old + 0.3 * torch.randn(2, 4, dtype=F64)).requires_grad_(True)
    advantages = torch.randn(2, 4, dtype=F64)
    assert torch.autograd.gradcheck(lambda lp: policy_loss(lp, logp_old, advantages, mask, 0.2).loss, (logp,))

    values_old, returns = torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    values = (values_old + 0.5 * torch.randn(2, 4, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: value_loss(v, values_old, returns, mask, 0.3).loss, (values,))

    better, worse = (
        torch.randn(3, dtype=F64, requires_grad=True),
        torch.randn(3, dtype=F64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda b, w: reward_model_loss(b, w, 0.01).loss, (better, worse))

    safe, unsafe = torch.tensor([True, False, True]), torch.tensor([False, False, True])
    assert torch.autograd.gradcheck(
        lambda b, w: cost_model_loss(b, w, safe, unsafe, 0.01).loss, (better, worse)
    )

    refs = torch.randn(2, 3, dtype=F64)
    assert torch.autograd.gradcheck(lambda c, r: dpo_loss(c, r, refs[0], refs[1], 0.5).loss, (better, worse))


def test_losses_agree_between_float32_and_float64():
    torch.manual_seed(1)
    mask = (torch.arange(64) < torch.randint(1, 65, (8, 1))).long()
    logp_old, advantages = -torch.rand(8, 64, dtype=F64) * 3, torch.randn(8, 64, dtype=F64)
    logp = logp_old + 0.2 * torch.randn(8, 64, dtype=F64)
    values, values_old, returns = (torch.randn(8, 64, dtype=F64) for _ in range(3))
    for loss_fn, args in [
        (lambda *a: policy_loss(*a, mask, 0.2).loss, (logp, logp_old, advantages)),
        (lambda *a: value_loss(*a, mask, 0.2).loss, (values, values_old, returns)),
        (lambda *a: reward_model_loss(*a).loss, (values[:, 0], values[:, 1])),
        (
            lambda *a: cost_model_loss(*a, mask[:, 0].bool(), mask[:, -1].bool()).loss,
            (values[:, 0], values[:, 1]),
        ),
    ]:
        loss64 = loss_fn(*args)
        loss32 = loss_fn(*(a.float() for a in args))
        assert loss32.dtype == torch.float32
        torch.testing.assert_close(loss32.double(), loss64, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ DPO

# Prompt [5, 6]; pad id 0, eos 2.
#   row 0: chosen   [5, 6, 7, 8, 2, 0]  mask [1, 1, 1, 1, 1, 0]
#          rejected [5, 6, 7, 9, 4, 2]  mask [1, 1, 1, 1, 1, 1]   first difference at token 3 (8 vs 9)
#          scored tokens: chosen 3, 4; rejected 3, 4, 5  →  log-prob entries t = token - 1
#   row 1: chosen   [5, 6, 7, 2, 0, 0]  a prefix of the rejected response; they differ at token 3
#          rejected [5, 6, 7, 8, 2, 0]  scored: chosen 3; rejected 3, 4
#   row 2: the ids agree everywhere, but position 3 is a masked-out pad (id 0) in the chosen row and
#          a real token 0 in the rejected one: the masks differ there, so that is the divergence.
#          scored: chosen 4 (3 is masked), rejected 3, 4.
CHOSEN = torch.tensor([[5, 6, 7, 8, 2, 0], [5, 6, 7, 2, 0, 0], [5, 6, 7, 0, 2, 0]])
CHOSEN_MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0]])
REJECTED = torch.tensor([[5, 6, 7, 9, 4, 2], [5, 6, 7, 8, 2, 0], [5, 6, 7, 0, 2, 0]])
REJECTED_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])


def test_divergence_mask_by_hand():
    chosen_scored, rejected_scored = divergence_mask(CHOSEN, REJECTED, CHOSEN_MASK, REJECTED_MASK)
    assert chosen_scored.dtype == torch.bool and chosen_scored.shape == (3, 5)
    assert chosen_scored.long().tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]]
    assert rejected_scored.long().tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]


def test_divergence_mask_of_an_identical_pair_is_empty():
    chosen_scored, rejected_scored = divergence_mask(CHOSEN, CHOSEN, CHOSEN_MASK, CHOSEN_MASK)
    assert not chosen_scored.any() and not rejected_scored.any()


def test_divergence_mask_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="padded to one shape"):
        divergence_mask(CHOSEN, REJECTED[:, :5], CHOSEN_MASK, REJECTED_MASK[:, :5])


def test_dpo_sequence_logprobs_score_from_the_first_differing_token_to_the_end():
    # Per-token log-probs from random logits, summed by hand with the causal shift written out:
    # token t is predicted by the logits at position t - 1.
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 10, dtype=F64)
    log_softmax = torch.log_softmax(logits, dim=-1)
    logp = gather_logprobs(logits[:, :-1], CHOSEN[:, 1:])  # (3, 5)
    chosen_scored, _ = divergence_mask(CHOSEN, REJECTED, CHOSEN_MASK, REJECTED_MASK)
    sums = sequence_logprob_sums(logp, chosen_scored)
    scored_tokens = [[3, 4], [3], [4]]  # the first differing token is included, padding never
    for row, tokens in enumerate(scored_tokens):
        expected = sum(log_softmax[row, t - 1, CHOSEN[row, t]] for t in tokens)
        torch.testing.assert_close(sums[row], expected)


def test_dpo_loss_by_hand():
    # β = 0.5; log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1; z = 0.5·(1 - (-1)) = 1.
    chosen = t64([-1.0]).requires_grad_(True)
    out = dpo_loss(chosen, t64([-3.0]), t64([-2.0]), t64([-2.0]), beta=0.5)
    torch.testing.assert_close(out.loss, t64(neg_log_sigmoid(1.0)))
    torch.testing.assert_close(out.chosen_rewards, t64([0.5]))
    torch.testing.assert_close(out.rejected_rewards, t64([-0.5]))
    assert out.accuracy.item() == 1.0
    out.loss.backward()
    # ∂/∂ log π(y_w) of -log σ(z) = -β·σ(-z).
    torch.testing.assert_close(chosen.grad, t64([-0.5 / (1 + math.e)]))
    # β = 0: no preference signal, loss log 2.
    torch.testing.assert_close(
        dpo_loss(t64([-1.0]), t64([-3.0]), t64([0.0]), t64([0.0]), 0.0).loss, t64(math.log(2))
    )


# ------------------------------------------------------------------------------------------------ SFT


def test_sft_loss_shifts_labels_and_ignores_masked_ones():
    # L = 3, V = 2. logits[0] = [0, log 3] predicts labels[1] = 1: -log(3/4);
    # logits[1] = [log 3, 0] predicts labels[2] = 1: -log(1/4). labels[0] is never predicted and the
    # last logits predict nothing (nan there is harmless).
    logits = t64([[[0.0, math.log(3.0)], [math.log(3.0), 0.0], [NAN, NAN]]])
    labels = torch.tensor([[0, 1, 1]])
    torch.testing.assert_close(sft_loss(logits, labels), t64((-math.log(0.75) - math.log(0.25)) / 2))
    torch.testing.assert_close(sft_loss(logits, torch.tensor([[0, -100, 1]])), t64(-math.log(0.25)))
    assert sft_loss(logits, torch.full((1, 3), -100)).item() == 0.0


def test_sft_loss_is_a_token_mean_over_the_batch():
    # Uniform logits over V = 4: every token costs log 4, whatever the row lengths.
    logits = torch.zeros(2, 5, 4)
    labels = torch.tensor([[-100, -100, 1, 2, 3], [-100, 0, -100, -100, -100]])
    torch.testing.assert_close(sft_loss(logits, labels), torch.tensor(math.log(4.0)))
