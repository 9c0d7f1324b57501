import math

import pytest

from mendctl.evaluation.metrics import accuracy, agreement, macro_f1, mean_kl


def test_macro_f1_by_hand():
    # a: recall 2/2, precision 2/3 -> F1 4/5; b: recall 1/2, precision 1/1 -> F1 2/3.
    assert macro_f1(["a", "a", "a", "b"], ["a", "a", "b", "b"]) == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_macro_f1_class_never_predicted_and_class_never_gold():
    golds = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "a", "d"]
    # a: recall 2/3; predicted at 0, 1, 4, right twice -> precision 2/3 -> F1 2/3.
    # b: recall 1/2; predicted at 2, 3, right once -> precision 1/2 -> F1 1/2.
    # c: never predicted: precision 1.0 (MetaICL), recall 0 -> F1 0.
    # d: predicted but no gold is d: not one of the averaged classes (a union average would divide by 4).
    assert macro_f1(preds, golds) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_macro_f1_perfect_and_all_wrong():
    assert macro_f1(["x", "y", "y"], ["x", "y", "y"]) == 1.0
    assert macro_f1(["y", "x"], ["x", "y"]) == 0.0


def test_accuracy_and_agreement():
    assert accuracy(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.75
    assert agreement([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    with pytest.raises(ValueError, match="3 predictions for 2"):
        accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no predictions"):
        macro_f1([], [])


def test_mean_kl():
    p = [[0.5, 1.5], [2.0, 2.0, 0.1]]
    assert mean_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    # softmax(-[0, 0]) = (1/2, 1/2); softmax(-[0, ln 3]) = (3/4, 1/4).
    # KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); the second query (identical) adds 0.
    q = [[0.0, math.log(3)], [2.0, 2.0, 0.1]]
    assert mean_kl([[0.0, 0.0], [2.0, 2.0, 0.1]], q) == pytest.approx(0.5 * math.log(4 / 3) / 2)
    assert mean_kl(p, [[1.5, 0.5], [0.1, 2.0, 2.0]]) > 0
    # Only differences of losses matter: the option distribution is a softmax.
    assert mean_kl([[1.0, 2.0]], [[11.0, 12.0]]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="option losses"):
        mean_kl([[1.0, 2.0]], [[1.0, 2.0, 3.0]])
