import math

import numpy as np
import pytest
import torch

from edgec.core.errors import EdgecError
from edgec.core.metrics import classification_metrics, regression_metrics


def test_classification_hand_computed():
    m = classification_metrics([0, 0, 0, 1], [0, 0, 1, 1], num_classes=2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["wa"] == m["accuracy"]
    # recall: class 0 = 2/3, class 1 = 1/1
    assert m["uar"] == pytest.approx((2 / 3 + 1) / 2)
    # precision: class 0 = 2/2, class 1 = 1/2 -> F1 0.8 and 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["n"] == 4


def test_uar_differs_from_wa_on_imbalance():
    # 8 of class 0 all right, 2 of class 1 all wrong: WA 0.8, UAR 0.5
    m = classification_metrics([0] * 8 + [1] * 2, [0] * 10, num_classes=2)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["uar"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 * 0.8 / 1.8 + 0) / 2)


def test_uar_ignores_classes_absent_from_truth_and_f1_counts_predicted_ones():
    m = classification_metrics([0, 0, 1, 1], [0, 2, 1, 1], num_classes=3)
    assert m["uar"] == pytest.approx((0.5 + 1.0) / 2)  # class 2 has no true examples
    # F1: class 0 (p=1, r=.5) 2/3, class 1 = 1, class 2 (predicted once, never true) = 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # class 3 of 4 neither true nor predicted: left out
    assert classification_metrics([0, 0, 1, 1], [0, 2, 1, 1], num_classes=4)["macro_f1"] == pytest.approx(m["macro_f1"])


def test_logits_and_tensors_accepted():
    logits = torch.tensor([[2.0, 0.1], [0.0, 1.0], [3.0, -1.0]])
    m = classification_metrics(torch.tensor([0, 1, 1]), logits, 2)
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_classification_errors():
    with pytest.raises(EdgecError, match="3 labels but y_pred has 2"):
        classification_metrics([0, 1, 1], [0, 1], 2)
    with pytest.raises(EdgecError, match=r"\[0, 2\)"):
        classification_metrics([0, 2], [0, 1], 2)
    with pytest.raises(EdgecError, match="no examples"):
        classification_metrics([], [], 2)


def test_regression_hand_computed():
    t = [1.0, 2.0, 3.0]
    perfect = regression_metrics(t, t)
    assert perfect["ccc"] == pytest.approx(1.0) and perfect["mae"] == 0.0
    # shift by 1: var_t = var_p = cov = 2/3, mean gap 1 -> ccc = (4/3) / (4/3 + 1) = 4/7
    shifted = regression_metrics(t, [2.0, 3.0, 4.0])
    assert shifted["ccc"] == pytest.approx(4 / 7)
    assert shifted["mae"] == pytest.approx(1.0)
    assert shifted["rmse"] == pytest.approx(1.0)
    # negated: cov = -2/3, mean gap 4 -> ccc = (-4/3) / (4/3 + 16) = -1/13
    assert regression_metrics(t, [-1.0, -2.0, -3.0])["ccc"] == pytest.approx(-1 / 13)
    # scaled by 2 around the mean: pearson 1 but ccc < 1
    assert regression_metrics(t, [0.0, 2.0, 4.0])["ccc"] == pytest.approx(2 * (4 / 3) / (2 / 3 + 8 / 3))


def test_regression_constant_and_multi_column():
    assert regression_metrics([2.0, 2.0], [2.0, 2.0])["ccc"] == 1.0
    assert regression_metrics([2.0, 2.0], [3.0, 3.0])["ccc"] == 0.0
    t = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0]])
    p = t.copy()
    p[:, 1] += 1.0  # column 0 perfect (1), column 1 shifted (4/7)
    assert regression_metrics(t, p)["ccc"] == pytest.approx((1 + 4 / 7) / 2)
    with pytest.raises(EdgecError, match="NaN"):
        regression_metrics([1.0, math.nan], [1.0, 2.0])


def test_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        t = rng.integers(0, 5, 200)
        p = np.where(rng.random(200) < 0.6, t, rng.integers(0, 5, 200))
        m = classification_metrics(t, p, 5)
        assert m["accuracy"] == pytest.approx(sk.accuracy_score(t, p))
        assert m["uar"] == pytest.approx(sk.balanced_accuracy_score(t, p))
        assert m["uar"] == pytest.approx(sk.recall_score(t, p, average="macro"))
        assert m["macro_f1"] == pytest.approx(sk.f1_score(t, p, average="macro"))
    y = rng.normal(size=100)
    yp = 0.7 * y + rng.normal(scale=0.5, size=100) + 0.2
    r = regression_metrics(y, yp)
    assert r["mae"] == pytest.approx(sk.mean_absolute_error(y, yp))
    pearson = np.corrcoef(y, yp)[0, 1]
    expected = 2 * pearson * y.std() * yp.std() / (y.var() + yp.var() + (y.mean() - yp.mean()) ** 2)
    assert r["ccc"] == pytest.approx(expected)
