"""DPO math in dpo_ray.losses, checked against values worked out by hand with ``math``.

Notation as in the paper (arXiv 2305.18290): h = log-ratio gap
    h = (log pi_theta(y_w) - log pi_ref(y_w)) - (log pi_theta(y_l) - log pi_ref(y_l)),
rewards r = beta * log-ratio, and the DPO loss -log sigmoid(beta * h) = -log sigmoid(r_w - r_l).
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo_ray.losses import (
    LossType,
    compute_dpo_loss,
    compute_pair_accuracy,
    compute_pair_accuracy_strict,
    compute_preference_metrics,
    compute_sequence_logps,
    compute_token_logps_chunked,
    sum_by_segment,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logsigmoid(x: float) -> float:
    return math.log(_sigmoid(x))


def _logps(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# A batch of three pairs with varied log-ratio gaps (one of them wrongly ranked), shared by the
# variant tests. Each entry: (policy chosen, policy rejected, ref chosen, ref rejected).
PAIRS = [(-10.0, -14.0, -11.0, -13.5), (-5.0, -4.0, -5.5, -5.0), (-20.0, -21.0, -20.0, -21.0)]
BETA = 0.2


def _pair_tensors():
    cols = list(zip(*PAIRS))
    return tuple(_logps(*c) for c in cols)


def _gaps() -> list[float]:
    # h_i = (pc - rc) - (pr - rr): pair 0: (1) - (-0.5) = 1.5; pair 1: (0.5) - (1.0) = -0.5; pair 2: 0 - 0 = 0.
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in PAIRS]


def test_gaps_used_by_the_variant_tests_are_the_hand_computed_ones():
    assert _gaps() == pytest.approx([1.5, -0.5, 0.0])


# ---------------------------------------------------------------------------- the textbook case


def test_sigmoid_loss_textbook_case_pi_0p6_0p4_vs_ref_0p5():
    # pi_theta(y_w|x) = 0.6, pi_theta(y_l|x) = 0.4, pi_ref(y|x) = 0.5 for both, beta = 0.1.
    beta = 0.1
    r_w = beta * math.log(0.6 / 0.5)  # 0.1 * ln 1.2 = 0.018232
    r_l = beta * math.log(0.4 / 0.5)  # 0.1 * ln 0.8 = -0.022314
    # r_w - r_l = 0.1 * ln(1.2 / 0.8) = 0.1 * ln 1.5 = 0.040547; sigmoid(0.040547) = 0.510135
    expected_loss = -math.log(_sigmoid(r_w - r_l))  # -ln 0.510135 = 0.673079
    # Second-order check: ln 2 - x/2 + x^2/8 at x = 0.040547 gives 0.693147 - 0.020273 + 0.000206 = 0.67308.
    assert expected_loss == pytest.approx(0.67308, abs=1e-5)

    out = compute_dpo_loss(
        _logps(math.log(0.6)), _logps(math.log(0.4)), _logps(math.log(0.5)), _logps(math.log(0.5)), beta, "sigmoid"
    )
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-9)
    assert out.losses.shape == (1,)
    assert out.chosen_rewards.item() == pytest.approx(r_w, rel=1e-9)
    assert out.rejected_rewards.item() == pytest.approx(r_l, rel=1e-9)

    metrics = compute_preference_metrics(
        out.chosen_rewards, out.rejected_rewards, _logps(math.log(0.6)), _logps(math.log(0.4))
    )
    assert metrics["rewards/chosen"].item() == pytest.approx(r_w, rel=1e-9)
    assert metrics["rewards/rejected"].item() == pytest.approx(r_l, rel=1e-9)
    assert metrics["rewards/margins"].item() == pytest.approx(r_w - r_l, rel=1e-9)  # 0.1 * ln 1.5 = 0.040547
    assert metrics["rewards/accuracy"].item() == 1.0
    assert metrics["rewards/accuracy_strict"].item() == 1.0
    assert metrics["logps/chosen"].item() == pytest.approx(math.log(0.6))
    assert metrics["logps/rejected"].item() == pytest.approx(math.log(0.4))


def test_rewards_are_detached_from_the_graph():
    pc = _logps(-1.0).requires_grad_()
    out = compute_dpo_loss(pc, _logps(-2.0), _logps(-1.5), _logps(-1.5), 0.1)
    assert out.loss.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_metrics_are_batch_means_over_pairs():
    chosen = torch.tensor([0.3, -0.1, 0.0, 0.2])
    rejected = torch.tensor([0.1, 0.2, 0.0, -0.4])
    # margins = [0.2, -0.3, 0.0, 0.6] -> mean 0.125; accuracy (1 + 0 + 0.5 + 1) / 4 = 0.625; strict 2 / 4.
    m = compute_preference_metrics(chosen, rejected, torch.tensor([-3.0, -5.0, -1.0, -7.0]),
                                   torch.tensor([-4.0, -2.0, -1.0, -8.0]))
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/rejected"].item() == pytest.approx(-0.025)
    assert m["rewards/margins"].item() == pytest.approx(0.125)
    assert m["rewards/accuracy"].item() == pytest.approx(0.625)
    assert m["rewards/accuracy_strict"].item() == pytest.approx(0.5)
    assert m["logps/chosen"].item() == pytest.approx(-4.0)
    assert m["logps/rejected"].item() == pytest.approx(-3.75)


# ---------------------------------------------------------------------------- variants, by hand


def test_sigmoid_loss_per_pair_and_mean_by_hand():
    expected = [-_logsigmoid(BETA * h) for h in _gaps()]
    out = compute_dpo_loss(*_pair_tensors(), BETA, LossType.SIGMOID)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-9)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-9)
    # pair 2 has h = 0: loss ln 2, the value at initialisation.
    assert out.losses[2].item() == pytest.approx(math.log(2))


def test_ipo_per_pair_loss_is_squared_distance_of_gap_from_half_inverse_beta():
    target = 1 / (2 * BETA)  # 2.5
    expected = [(h - target) ** 2 for h in _gaps()]  # (1.5-2.5)^2 = 1, (-0.5-2.5)^2 = 9, (0-2.5)^2 = 6.25
    assert expected == pytest.approx([1.0, 9.0, 6.25])
    gaps = torch.tensor(_gaps(), dtype=torch.float64)
    assert LossType.IPO.per_pair_loss(gaps, BETA).tolist() == pytest.approx(expected, rel=1e-12)


# Response token counts for PAIRS (chosen, rejected), for the per-token average of IPO.
CHOSEN_COUNTS = [4, 2, 5]
REJECTED_COUNTS = [2, 5, 1]


def _counts() -> dict[str, torch.Tensor]:
    return {
        "chosen_token_counts": torch.tensor(CHOSEN_COUNTS, dtype=torch.int64),
        "rejected_token_counts": torch.tensor(REJECTED_COUNTS, dtype=torch.int64),
    }


def test_ipo_averages_each_log_ratio_per_token_as_trl_by_hand():
    # TRL 1.16 (trl/trainer/dpo_trainer.py, loss_type "ipo"): h_bar = h_w / n_w - h_l / n_l,
    # loss (h_bar - 1/(2 beta))^2.
    # Log-ratios of PAIRS: h_w = pc - rc = [1, 0.5, 0], h_l = pr - rr = [-0.5, 1, 0]; counts n_w = [4, 2, 5],
    # n_l = [2, 5, 1].
    # pair 0: 1 / 4 - (-0.5) / 2 = 0.25 + 0.25 = 0.5
    # pair 1: 0.5 / 2 - 1 / 5 = 0.25 - 0.2 = 0.05
    # pair 2: 0 / 5 - 0 / 1 = 0
    # It is the same as averaging the policy and the reference log-probs alike; pair 0:
    # chosen -10/4 - (-11/4) = 0.25, rejected -14/2 - (-13.5/2) = -0.25, gap 0.25 - (-0.25) = 0.5.
    h_bar = [
        (pc - rc) / nw - (pr - rr) / nl for (pc, pr, rc, rr), nw, nl in zip(PAIRS, CHOSEN_COUNTS, REJECTED_COUNTS)
    ]
    assert h_bar == pytest.approx([0.5, 0.05, 0.0])
    # beta = 0.2, target 1 / (2 * 0.2) = 2.5:
    # (0.5 - 2.5)^2 = 4, (0.05 - 2.5)^2 = 2.45^2 = 6.0025, (0 - 2.5)^2 = 6.25; mean 16.2525 / 3 = 5.4175
    expected = [4.0, 6.0025, 6.25]
    out = compute_dpo_loss(*_pair_tensors(), BETA, "ipo", **_counts())
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.loss.item() == pytest.approx(5.4175, rel=1e-12)
    # With summed log-ratios it would be [1, 9, 6.25] (the test above): the average changes the loss.
    assert out.losses[0].item() != pytest.approx(1.0)
    # Rewards stay beta * summed log-ratio, as TRL 1.16 logs rewards/chosen and rewards/rejected for IPO too:
    # chosen 0.2 * [1, 0.5, 0] = [0.2, 0.1, 0], rejected 0.2 * [-0.5, 1, 0] = [-0.1, 0.2, 0].
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, 0.1, 0.0], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.2, 0.0], rel=1e-12)


def test_ipo_gradient_is_scaled_by_one_over_the_token_count():
    # d/d(log pi(y_w,i)) of mean_i (h_bar_i - 2.5)^2 = 2 * (h_bar_i - 2.5) / n_w,i / B, with B = 3:
    # pair 0: 2 * (0.5 - 2.5) / 4 / 3 = -1/3; pair 1: 2 * (0.05 - 2.5) / 2 / 3 = -2.45/3;
    # pair 2: 2 * (-2.5) / 5 / 3 = -1/3.
    # For log pi(y_l,i) the sign flips and n_l replaces n_w: 2 * (h_bar - 2.5) * (-1 / n_l) / 3
    # pair 0: -2 * (-2) / 2 / 3 = 2/3; pair 1: -2 * (-2.45) / 5 / 3 = 0.98/3; pair 2: -2 * (-2.5) / 1 / 3 = 5/3.
    pc, pr, rc, rr = _pair_tensors()
    pc.requires_grad_()
    pr.requires_grad_()
    compute_dpo_loss(pc, pr, rc, rr, BETA, LossType.IPO, **_counts()).loss.backward()
    assert pc.grad.tolist() == pytest.approx([-1 / 3, -2.45 / 3, -1 / 3], rel=1e-12)
    assert pr.grad.tolist() == pytest.approx([2 / 3, 0.98 / 3, 5 / 3], rel=1e-12)


def test_ipo_without_both_token_counts_raises():
    with pytest.raises(ValueError, match="chosen_token_counts and rejected_token_counts"):
        compute_dpo_loss(*_pair_tensors(), BETA, "ipo")
    # the chosen counts alone (what the RPO term needs) are not enough
    with pytest.raises(ValueError, match="rejected_token_counts"):
        compute_dpo_loss(*_pair_tensors(), BETA, "ipo", chosen_token_counts=torch.tensor(CHOSEN_COUNTS))
    with pytest.raises(ValueError, match="chosen_token_counts"):
        compute_dpo_loss(*_pair_tensors(), BETA, "ipo", rejected_token_counts=torch.tensor(REJECTED_COUNTS))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust"])
def test_summed_losses_ignore_token_counts(loss_type):
    # Only IPO averages per token: the other losses give the same value with or without counts.
    plain = compute_dpo_loss(*_pair_tensors(), 1.0, loss_type)
    with_counts = compute_dpo_loss(*_pair_tensors(), 1.0, loss_type, **_counts())
    assert with_counts.losses.tolist() == plain.losses.tolist()


def test_loss_type_members_carry_averaging_and_label_smoothing():
    assert {m.value for m in LossType if m.averages_per_token} == {"ipo"}
    assert {m.value for m in LossType if m.uses_label_smoothing} == {"sigmoid", "robust"}


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_label_smoothing_on_a_loss_that_ignores_it_raises(loss_type):
    with pytest.raises(ValueError, match=r"label_smoothing=0\.1 has no effect.*sigmoid, robust"):
        compute_dpo_loss(*_pair_tensors(), BETA, loss_type, label_smoothing=0.1, **_counts())
    # 0, the value that means "no smoothing", passes and is the loss without the argument
    out = compute_dpo_loss(*_pair_tensors(), BETA, loss_type, label_smoothing=0.0, **_counts())
    assert out.losses.tolist() == compute_dpo_loss(*_pair_tensors(), BETA, loss_type, **_counts()).losses.tolist()


def test_hinge_loss_is_relu_of_one_minus_beta_gap():
    beta = 1.0  # so that one pair is past the margin: 1 - 1.5 < 0
    expected = [max(0.0, 1 - beta * h) for h in _gaps()]  # [0, 1.5, 1]
    assert expected == pytest.approx([0.0, 1.5, 1.0])
    out = compute_dpo_loss(*_pair_tensors(), beta, "hinge")
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-9)
    assert out.loss.item() == pytest.approx(2.5 / 3, rel=1e-9)


def test_robust_loss_by_hand():
    eps = 0.1
    expected = [
        (-(1 - eps) * _logsigmoid(BETA * h) + eps * _logsigmoid(-BETA * h)) / (1 - 2 * eps) for h in _gaps()
    ]
    out = compute_dpo_loss(*_pair_tensors(), BETA, "robust", label_smoothing=eps)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-9)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-9)


def test_conservative_dpo_label_smoothing_by_hand():
    eps = 0.1
    expected = [-(1 - eps) * _logsigmoid(BETA * h) - eps * _logsigmoid(-BETA * h) for h in _gaps()]
    out = compute_dpo_loss(*_pair_tensors(), BETA, "sigmoid", label_smoothing=eps)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-9)
    # cDPO differs from plain DPO when eps > 0.
    plain = compute_dpo_loss(*_pair_tensors(), BETA, "sigmoid")
    assert not torch.allclose(out.losses, plain.losses)


@pytest.mark.parametrize("loss_type", ["robust", "sigmoid"])
def test_robust_and_cdpo_reduce_to_plain_dpo_at_zero_label_smoothing(loss_type):
    plain = [-_logsigmoid(BETA * h) for h in _gaps()]
    out = compute_dpo_loss(*_pair_tensors(), BETA, loss_type, label_smoothing=0.0)
    assert out.losses.tolist() == pytest.approx(plain, rel=1e-12)


def test_loss_type_resolves_by_name_and_matches_per_pair_loss():
    for name in ("sigmoid", "ipo", "hinge", "robust"):
        assert LossType(name).value == name
    assert LossType("ipo") is LossType.IPO
    gaps = torch.tensor(_gaps(), dtype=torch.float64)
    assert LossType("hinge").per_pair_loss(gaps, 1.0).tolist() == pytest.approx([0.0, 1.5, 1.0])
    # The string and enum forms give the same loss.
    a = compute_dpo_loss(*_pair_tensors(), BETA, "ipo", **_counts()).loss
    b = compute_dpo_loss(*_pair_tensors(), BETA, LossType.IPO, **_counts()).loss
    assert a.item() == b.item()


def test_unknown_loss_type_raises_value_error():
    with pytest.raises(ValueError):
        LossType("kto_pair")
    with pytest.raises(ValueError):
        compute_dpo_loss(*_pair_tensors(), BETA, "not-a-loss")


# ---------------------------------------------------------------------------- RPO


def test_rpo_alpha_adds_mean_per_token_nll_of_chosen():
    alpha = 0.5
    counts = torch.tensor([4, 2, 5])
    dpo = sum(-_logsigmoid(BETA * h) for h in _gaps()) / 3
    # chosen logps [-10, -5, -20] over [4, 2, 5] tokens: NLL per token [2.5, 2.5, 4.0], mean 3.0.
    nll = sum(-pc / n for (pc, _, _, _), n in zip(PAIRS, [4, 2, 5])) / 3
    assert nll == pytest.approx(3.0)
    out = compute_dpo_loss(*_pair_tensors(), BETA, "sigmoid", rpo_alpha=alpha, chosen_token_counts=counts)
    assert out.loss.item() == pytest.approx(dpo + alpha * nll, rel=1e-9)
    # The per-pair preference losses do not include the RPO term.
    assert out.losses.tolist() == pytest.approx([-_logsigmoid(BETA * h) for h in _gaps()], rel=1e-9)


def test_rpo_alpha_without_chosen_token_counts_raises():
    with pytest.raises(ValueError, match="chosen_token_counts"):
        compute_dpo_loss(*_pair_tensors(), BETA, rpo_alpha=1.0)


def test_rpo_alpha_zero_ignores_token_counts():
    a = compute_dpo_loss(*_pair_tensors(), BETA)
    b = compute_dpo_loss(*_pair_tensors(), BETA, rpo_alpha=0.0, chosen_token_counts=torch.tensor([1, 1, 1]))
    assert a.loss.item() == b.loss.item()


# ---------------------------------------------------------------------------- gradients


def test_sigmoid_loss_gradient_matches_the_paper_formula():
    # log pi_theta(y_w) = w . a_i and log pi_theta(y_l) = w . b_i for a parameter vector w; then
    # dL/dw = mean_i [ -beta * sigmoid(r_l,i - r_w,i) * (a_i - b_i) ].
    beta = 0.3
    w_val = [0.5, -1.0, 2.0]
    a = [[1.0, 0.0, -1.0], [0.5, 2.0, 1.0]]
    b = [[0.0, 1.0, 0.5], [1.5, -1.0, 0.0]]
    ref_w = [-1.0, 0.2]
    ref_l = [0.3, -0.7]

    w = torch.tensor(w_val, dtype=torch.float64, requires_grad=True)
    A = torch.tensor(a, dtype=torch.float64)
    B = torch.tensor(b, dtype=torch.float64)
    out = compute_dpo_loss(A @ w, B @ w, torch.tensor(ref_w, dtype=torch.float64),
                           torch.tensor(ref_l, dtype=torch.float64), beta)
    out.loss.backward()

    dot = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    expected = [0.0, 0.0, 0.0]
    for i in range(2):
        r_w = beta * (dot(w_val, a[i]) - ref_w[i])
        r_l = beta * (dot(w_val, b[i]) - ref_l[i])
        weight = _sigmoid(r_l - r_w)
        for k in range(3):
            expected[k] += -beta * weight * (a[i][k] - b[i][k]) / 2
    assert w.grad.tolist() == pytest.approx(expected, rel=1e-9)


def test_wrongly_ranked_pair_gets_a_larger_gradient_weight():
    beta = 0.1
    # pair 0 ranked right (h = +5), pair 1 ranked wrong (h = -5); ref logps equal to zero.
    pc = torch.tensor([-5.0, -15.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-10.0, -10.0], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(2, dtype=torch.float64)
    compute_dpo_loss(pc, pr, zeros, zeros, beta).loss.backward()
    # dL/dlogp_w,i = -beta * sigmoid(r_l - r_w) / B and dL/dlogp_l,i is its negative.
    expected = [-beta * _sigmoid(-beta * 5) / 2, -beta * _sigmoid(beta * 5) / 2]
    assert pc.grad.tolist() == pytest.approx(expected, rel=1e-9)
    assert pr.grad.tolist() == pytest.approx([-e for e in expected], rel=1e-9)
    assert abs(pc.grad[1]) > abs(pc.grad[0])  # the wrongly ranked pair is pushed harder
    assert pc.grad[0] < 0 and pc.grad[1] < 0  # gradient descent raises log pi(y_w) for both


# ---------------------------------------------------------------------------- accuracy


def test_pair_accuracy_counts_ties_as_half():
    margins = torch.tensor([0.3, -0.2, 0.0, 1e-8])
    assert compute_pair_accuracy(margins).tolist() == [1.0, 0.0, 0.5, 1.0]
    assert compute_pair_accuracy_strict(margins).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_accuracy_at_step_zero_is_half_and_strict_zero():
    # Before the first update the policy equals the reference: every reward is 0, every margin a tie.
    logps_w = torch.tensor([-12.0, -3.5, -40.0])
    logps_l = torch.tensor([-11.0, -7.0, -2.0])
    out = compute_dpo_loss(logps_w, logps_l, logps_w.clone(), logps_l.clone(), 0.1)
    assert out.loss.item() == pytest.approx(math.log(2))
    m = compute_preference_metrics(out.chosen_rewards, out.rejected_rewards, logps_w, logps_l)
    assert m["rewards/accuracy"].item() == 0.5
    assert m["rewards/accuracy_strict"].item() == 0.0
    assert m["rewards/margins"].item() == 0.0


# ---------------------------------------------------------------------------- sequence log-probs

# Vocabulary of 3 tokens. One sequence: prompt [2, 0], response [1, 2]. Logits at position t predict
# the token at t + 1, so the response tokens are predicted by positions 1 (token 1) and 2 (token 2).
_ROW_LOGITS = [
    [0.5, -1.0, 2.0],  # t=0 predicts prompt token 0 (not counted)
    [1.0, 2.0, 0.0],  # t=1 predicts response token 1
    [0.0, -0.5, 3.0],  # t=2 predicts response token 2
    [9.0, 9.0, 9.0],  # t=3 predicts nothing (last position)
]
_TOKENS = [2, 0, 1, 2]
_RESPONSE_MASK = [0, 0, 1, 1]


def _log_softmax_at(row: list[float], idx: int) -> float:
    return row[idx] - math.log(sum(math.exp(v) for v in row))


def _expected_response_logp() -> float:
    # log softmax([1, 2, 0])[1] + log softmax([0, -0.5, 3])[2]
    return _log_softmax_at(_ROW_LOGITS[1], 1) + _log_softmax_at(_ROW_LOGITS[2], 2)


def test_sequence_logps_sum_log_softmax_at_response_positions_by_hand():
    logits = torch.tensor([_ROW_LOGITS], dtype=torch.float64)
    got = compute_sequence_logps(logits, torch.tensor([_TOKENS]), torch.tensor([_RESPONSE_MASK]))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(_expected_response_logp(), rel=1e-6)
    # [2 - ln(e + e^2 + 1)] + [3 - ln(1 + e^-0.5 + e^3)] = (2 - 2.407606) + (3 - 3.076947) = -0.484553
    assert got.item() == pytest.approx(-0.484553, abs=1e-5)


def test_sequence_logps_right_and_left_padding_agree():
    pad_logits = [7.0, -3.0, 0.25]
    pad = 0
    right_logits = torch.tensor([_ROW_LOGITS + [pad_logits, pad_logits]])
    right_labels = torch.tensor([_TOKENS + [pad, pad]])
    right_mask = torch.tensor([_RESPONSE_MASK + [0, 0]])
    left_logits = torch.tensor([[pad_logits, pad_logits] + _ROW_LOGITS])
    left_labels = torch.tensor([[pad, pad] + _TOKENS])
    left_mask = torch.tensor([[0, 0] + _RESPONSE_MASK])
    right = compute_sequence_logps(right_logits, right_labels, right_mask)
    left = compute_sequence_logps(left_logits, left_labels, left_mask)
    assert right.item() == pytest.approx(_expected_response_logp(), rel=1e-6)
    assert left.item() == pytest.approx(right.item(), rel=1e-6)


def test_sequence_logps_ignore_prompt_and_padding_logits():
    logits = torch.tensor([_ROW_LOGITS + [[0.0, 0.0, 0.0]]])
    labels = torch.tensor([_TOKENS + [0]])
    mask = torch.tensor([_RESPONSE_MASK + [0]])
    base = compute_sequence_logps(logits, labels, mask)
    changed = logits.clone()
    changed[0, 0] = torch.tensor([-50.0, 40.0, 3.0])  # predicts a prompt token
    changed[0, 3] = torch.tensor([100.0, -100.0, 5.0])  # predicts the padding
    changed[0, 4] = torch.tensor([1e4, -1e4, 0.0])  # padding position
    assert compute_sequence_logps(changed, labels, mask).item() == base.item()
    # ...while changing a logit that predicts a response token does change it.
    changed[0, 1, 1] += 1.0
    assert compute_sequence_logps(changed, labels, mask).item() != base.item()


def test_sequence_logps_ignore_the_ignore_index_in_padded_labels():
    logits = torch.tensor([_ROW_LOGITS + [[0.0, 1.0, 2.0]]])
    mask = torch.tensor([_RESPONSE_MASK + [0]])
    a = compute_sequence_logps(logits, torch.tensor([_TOKENS + [0]]), mask)
    b = compute_sequence_logps(logits, torch.tensor([_TOKENS + [-100]]), mask)
    assert a.item() == b.item() == pytest.approx(_expected_response_logp(), rel=1e-6)


def test_sequence_logps_ignore_non_finite_logits_at_padding_positions():
    logits = torch.tensor([_ROW_LOGITS + [[0.0, 0.0, 0.0]]])
    logits[0, 3] = float("nan")  # predicts the padding token, masked out
    got = compute_sequence_logps(logits, torch.tensor([_TOKENS + [0]]), torch.tensor([_RESPONSE_MASK + [0]]))
    assert got.item() == pytest.approx(_expected_response_logp(), rel=1e-6)


def test_sequence_logps_batch_of_rows_with_different_response_lengths():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4, 0, 0], [4, 3, 2, 1, 0, 2]])
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]])
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(1, 6):
            if mask[b, t]:
                total += _log_softmax_at(logits[b, t - 1].tolist(), int(labels[b, t]))
        expected.append(total)
    # compute_sequence_logps works in fp32
    assert compute_sequence_logps(logits, labels, mask).tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_chunked_token_logps_and_segment_sums_match_full_log_softmax(chunk_size):
    torch.manual_seed(1)
    hidden_size, vocab = 8, 11
    head = torch.nn.Linear(hidden_size, vocab, bias=False).double()
    hidden = torch.randn(7, hidden_size, dtype=torch.float64)
    targets = torch.tensor([3, 0, 10, 5, 5, 1, 7])
    segment = torch.tensor([0, 0, 0, 2, 2, 1, 2])  # three sequences of 3, 1 and 3 tokens

    with torch.no_grad():
        full = torch.log_softmax(head(hidden), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():
        token_logps = compute_token_logps_chunked(hidden, targets, head, chunk_size=chunk_size)
    assert token_logps.dtype == torch.float32
    torch.testing.assert_close(token_logps.double(), full, atol=1e-6, rtol=1e-6)

    sums = sum_by_segment(token_logps, segment, num_segments=4)
    expected = [float(full[segment == s].sum()) for s in range(4)]
    assert expected[3] == 0.0  # a sequence without tokens sums to 0
    assert sums.tolist() == pytest.approx(expected, abs=1e-5)


def test_chunked_token_logps_of_no_tokens_is_empty():
    head = torch.nn.Linear(4, 6)
    out = compute_token_logps_chunked(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), head)
    assert out.shape == (0,) and out.dtype == torch.float32


def test_chunked_token_logps_carry_gradients_to_the_head():
    torch.manual_seed(2)
    head = torch.nn.Linear(4, 6, bias=False)
    hidden = torch.randn(5, 4, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4])
    compute_token_logps_chunked(hidden, targets, head, chunk_size=2).sum().backward()
    chunked_grad = head.weight.grad.clone()
    head.weight.grad = None
    torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).sum().backward()
    torch.testing.assert_close(chunked_grad, head.weight.grad)
