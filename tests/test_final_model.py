"""A site's final model (client/site_model/final.py): never worse on its own validation split than alone or global."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedtransfer.client.site_model.final import Gate, Mix, Tuning, choose_final, fit_alone, paired_se, validation_split
from fedtransfer.client.site_model.guard import CONFIDENCE, keeps, pseudo_records, rare_classes
from fedtransfer.common.model.head import evaluate_head, make_head
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head

DIM, CLASSES = 16, 4
CENTRES = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))


def _records(n: int, skew: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` records; a share `skew` of them of class 0, the rest spread over the other classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.where(torch.rand(n, generator=g) < skew, 0, torch.randint(1, CLASSES, (n,), generator=g))
    return CENTRES[y] + 1.2 * torch.randn(n, DIM, generator=g), y


def _trained_global(seed: int = 5) -> torch.nn.Module:
    """A global model trained on many balanced records: what a federation of many sites would know."""
    x, y = _records(3000, 0.25, seed)
    torch.manual_seed(seed)
    head = make_head(DIM, CLASSES)
    train_head(head, x, y, LocalTraining(10, 64, 0.5), None, [], seed=seed)
    return head.eval()


def test_the_alone_head_is_the_logistic_regression_it_was_fitted_as() -> None:
    """The same objective as scikit-learn's multinomial regression, and nothing for a class the site never saw."""
    from sklearn.linear_model import LogisticRegression

    x, y = _records(300, 0.4, 1)
    keep = y != 2  # class 2: never seen at this site
    x, y = x[keep], y[keep]
    head = fit_alone(x, y, CLASSES, 10.0).eval()
    unit = torch.nn.functional.normalize(x, dim=1).numpy()
    expected = LogisticRegression(C=10.0, max_iter=2000, tol=1e-8).fit(unit, y.numpy()).predict_proba(unit)
    with torch.no_grad():
        got = head(x).softmax(1).numpy()
    np.testing.assert_allclose(got[:, [0, 1, 3]], expected, atol=2e-3)
    assert got[:, 2].max() < 1e-6
    one = fit_alone(x[y == 1], y[y == 1], CLASSES, 10.0)  # one class only: always that class
    assert (one(x).argmax(1) == 1).all()


def test_validation_is_carved_from_the_training_split_stratified() -> None:
    _, y = _records(200, 0.7, 2)
    fit, val = validation_split(y, seed=0)
    assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == 200 and len(val) == 40
    shares = np.bincount(y.numpy()[val], minlength=CLASSES) / len(val)
    assert abs(shares[0] - (y == 0).float().mean().item()) < 0.03
    assert len(validation_split(y[:9], seed=0)[1]) == 0  # too few to hold any out


def test_a_site_with_its_own_skew_and_a_poor_global_model_does_not_keep_the_global_model() -> None:
    x, y = _records(500, 0.8, 3)
    tx, ty = _records(400, 0.8, 4)
    torch.manual_seed(0)
    poor = make_head(DIM, CLASSES)  # untrained: knows nothing of this site
    final = choose_final(poor, x, y, CLASSES, Tuning(seed=0))
    assert final.chosen != "global"
    names = [c.name for c in final.candidates]
    assert names[0] == "global" and names[-1] == "alone"  # candidates from most to least collaborative
    assert any(n.startswith("mix ") for n in names)
    chosen = next(c for c in final.candidates if c.name == final.chosen)
    best = min(c.loss for c in final.candidates)
    assert best <= chosen.loss <= best + 0.05  # within noise of the lowest validation loss
    own = evaluate_head(final.model, tx, ty).accuracy
    assert own >= evaluate_head(final.alone, tx, ty).accuracy - 0.03
    assert own > evaluate_head(poor, tx, ty).accuracy + 0.3


def test_a_small_site_keeps_what_a_good_global_model_knows() -> None:
    """40 records of a site's own: going alone generalises poorly; the final model stays near the global one."""
    x, y = _records(40, 0.25, 6)
    tx, ty = _records(1000, 0.25, 7)
    good = _trained_global()
    final = choose_final(good, x, y, CLASSES, Tuning(seed=0))
    assert final.chosen != "alone"
    assert evaluate_head(final.model, tx, ty).accuracy >= evaluate_head(final.alone, tx, ty).accuracy


def test_a_mix_keeps_the_global_model_on_classes_the_site_never_saw() -> None:
    """A site of classes 0 and 1 only: its alone model is blind to 2 and 3, the mix with global is not."""
    x, y = _records(600, 0.5, 9)
    keep = y <= 1
    alone = fit_alone(x[keep], y[keep], CLASSES, 10.0).eval()
    good = _trained_global()
    mix = Mix(alone, good, 0.5).eval()
    tx, ty = _records(2000, 0.25, 10)
    home, away = ty <= 1, ty >= 2
    with torch.no_grad():
        assert torch.allclose(mix(tx).exp().sum(1), torch.ones(len(ty)), atol=1e-5)
    assert evaluate_head(alone, tx[away], ty[away]).accuracy == 0.0
    assert evaluate_head(mix, tx[away], ty[away]).accuracy > 0.5
    assert evaluate_head(mix, tx[home], ty[home]).accuracy >= evaluate_head(alone, tx[home], ty[home]).accuracy - 0.03


@pytest.mark.parametrize("n", [1, 5])
def test_below_ten_records_the_global_model_is_kept_with_its_reason(n: int) -> None:
    x, y = _records(n, 0.5, 8)
    good = _trained_global()
    final = choose_final(good, x, y, CLASSES, Tuning(seed=0))
    assert final.chosen == "global" and "too few" in final.reason and final.candidates == ()


def test_the_paired_standard_error_is_that_of_the_mean_difference() -> None:
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 1.0, 1.0, 1.0])
    assert paired_se(a, b) == pytest.approx(np.std(a - b, ddof=1) / 2)
    assert paired_se(a[:1], b[:1]) == 0.0


def _two_class_site(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A site of classes 0 and 1 only (label skew): the federation knows 2 and 3, the site does not."""
    x, y = _records(2 * n, 0.5, seed)
    keep = y <= 1
    return x[keep][:n], y[keep][:n]


def test_pseudo_records_are_what_the_global_model_is_sure_of_in_the_sites_rare_classes() -> None:
    x, y = _two_class_site(400, 11)
    rare = rare_classes(y, CLASSES)
    assert rare.tolist() == [False, False, True, True]
    good = _trained_global()
    px, py = pseudo_records(good, x, rare, seed=0)
    assert len(py) > 20 and set(py.tolist()) <= {2, 3}
    with torch.no_grad():
        assert (good(px).softmax(1).gather(1, py[:, None]) >= CONFIDENCE).all()
    assert keeps(good, px, py) == 1.0
    assert keeps(fit_alone(x, y, CLASSES, 10.0), px, py) == 0.0  # alone overrides the global model there
    assert len(pseudo_records(good, x, torch.zeros(CLASSES, dtype=torch.bool), seed=0)[1]) == 0


def test_under_label_skew_the_final_model_keeps_the_classes_the_site_never_saw() -> None:
    """The site's own validation holds classes 0 and 1 only; its final model must still know 2 and 3
    (the global model's answer), and at home lose no more to alone than noise explains."""
    x, y = _two_class_site(400, 12)
    good = _trained_global()
    final = choose_final(good, x, y, CLASSES, Tuning(seed=0))
    tx, ty = _records(3000, 0.25, 13)
    home, away = ty <= 1, ty >= 2
    assert evaluate_head(final.alone, tx[away], ty[away]).accuracy == 0.0
    assert evaluate_head(final.model, tx[away], ty[away]).accuracy > 0.5
    own = evaluate_head(final.model, tx[home], ty[home]).accuracy
    assert own >= evaluate_head(final.alone, tx[home], ty[home]).accuracy - 0.03
    assert "rare classes" in final.reason
    kept = {c.name: c.kept for c in final.candidates}
    assert kept["global"] == 1.0 and kept["alone"] == 0.0 and kept[final.chosen] >= 0.9


def test_a_gate_leaves_other_classes_to_the_global_model_and_splits_its_own_as_alone_does() -> None:
    x, y = _two_class_site(400, 14)
    alone, good = fit_alone(x, y, CLASSES, 10.0).eval(), _trained_global()
    present = torch.tensor([True, True, False, False])
    gate = Gate(alone, good, present, 0.0).eval()
    tx, _ = _records(500, 0.25, 15)
    with torch.no_grad():
        out, g, a = gate(tx).exp(), good(tx).softmax(1), alone(tx).softmax(1)
    assert torch.allclose(out.sum(1), torch.ones(len(tx)), atol=1e-5)
    assert torch.allclose(out[:, 2:], g[:, 2:], atol=1e-5)  # bias 0: the global model's own
    assert torch.allclose(out[:, 0] / out[:, :2].sum(1), a[:, 0] / a[:, :2].sum(1), atol=1e-4)
