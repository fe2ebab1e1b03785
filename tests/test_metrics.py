"""The evaluation classifier and the metrics: identities on real data, and the classifier cache."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch

from cfg_minimal import classifier as classifier_module
from cfg_minimal.classifier import (
    FEATURE_DIM,
    Classifier,
    cache_path,
    load_or_train_classifier,
    random_translate,
    train_classifier,
)
from cfg_minimal.data import load_dataset
from cfg_minimal.metrics import (
    accuracy,
    class_diversity,
    classifier_score,
    classifier_stats,
    frechet_distance,
    mean_pairwise_distance,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # shared/ sits beside the repo root
DIGITS_TRAIN_STEPS = 200  # fewer than the digits entry's classifier_train_steps, for speed; still ~99% test accuracy


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Train on one thread: on a small shared CPU, two OpenMP threads that wait on each other while
    another process holds a core made these tests ~7x slower (88 s instead of 15 s on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The digits classifier, trained once for the module into a temporary cache, and its view of the test set."""
    cache_dir = tmp_path_factory.mktemp("classifier_cache")
    model, test_acc = load_or_train_classifier(
        "digits", cache_dir, cache_dir, progress=False, train_steps=DIGITS_TRAIN_STEPS
    )
    test = load_dataset("digits", train=False)
    return SimpleNamespace(
        cache_dir=cache_dir, model=model, test_acc=test_acc, test=test, stats=classifier_stats(model, test.images)
    )


# --- classifier ---------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,size", [(1, 16), (1, 28), (3, 32)])
def test_classifier_shapes(channels: int, size: int) -> None:
    model = Classifier(channels, size, num_classes=7).eval()
    x = torch.rand(5, channels, size, size) * 2 - 1
    assert model(x).shape == (5, 7)
    assert model.features(x).shape == (5, FEATURE_DIM)


def test_random_translate_moves_a_pixel_by_at_most_max_shift() -> None:
    x = torch.full((64, 1, 9, 9), -1.0)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the centre
    out = random_translate(x, max_shift=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    rows, cols = (out[:, 0] == 1.0).nonzero()[:, 1:].T  # each image still has exactly one bright pixel
    assert len(rows) == 64
    assert (rows - 4).abs().max() <= 2 and (cols - 4).abs().max() <= 2
    assert len({(r, c) for r, c in zip(rows.tolist(), cols.tolist())}) > 10  # shifts differ per image
    assert torch.equal(random_translate(x, max_shift=0), x)


def test_digits_classifier_is_accurate(digits: SimpleNamespace) -> None:
    assert digits.test_acc >= 0.95
    assert not digits.model.training


def test_real_test_set_scored_against_itself(digits: SimpleNamespace) -> None:
    feats, labels = digits.stats.features, digits.test.labels
    between_classes = frechet_distance(feats[labels == 0], feats[labels == 1])
    assert frechet_distance(feats, feats) < 1e-6 * between_classes
    assert accuracy(digits.stats.logits, labels) == digits.test_acc
    assert accuracy(digits.stats.preds, labels) == digits.test_acc


def test_shuffled_labels_give_chance_accuracy(digits: SimpleNamespace) -> None:
    labels = digits.test.labels
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert abs(accuracy(digits.stats.preds, shuffled) - 0.1) < 0.1  # chance is ~1/10; std ~0.016 at N=359


def test_frechet_distance_separates_classes_from_halves(digits: SimpleNamespace) -> None:
    feats, labels = digits.stats.features, digits.test.labels
    half = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))
    same_set = frechet_distance(feats[half[::2]], feats[half[1::2]])
    different_classes = frechet_distance(feats[labels == 3], feats[labels == 7])
    assert 0 < same_set < different_classes


def test_class_diversity_is_zero_for_collapsed_classes(digits: SimpleNamespace) -> None:
    feats, labels = digits.stats.features, digits.test.labels
    real = class_diversity(feats, labels, 10)
    assert real > 0
    # every image of class k replaced by the first image of class k: each class collapses to a point
    first = torch.stack([digits.test.images[labels == k][0] for k in range(10)])  # (10, C, H, W)
    collapsed = classifier_stats(digits.model, first[labels]).features  # (N, D)
    assert class_diversity(collapsed, labels, 10) == 0.0
    assert mean_pairwise_distance(collapsed) > 0  # the classes still differ from each other


# --- metrics on synthetic features --------------------------------------------------------------


def test_frechet_distance_identities() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    b = torch.randn(200, 16, generator=gen) * 2 + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * frechet_distance(a, b))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0
    shift = torch.arange(16.0)  # same covariance, mean moved by `shift`: d^2 = ||shift||^2 exactly
    assert frechet_distance(a, a + shift) == pytest.approx(shift.square().sum().item(), rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(100, 8, generator=gen) @ torch.randn(8, 8, generator=gen)
    b = torch.randn(50, 8, generator=gen) @ torch.randn(8, 8, generator=gen) + 0.5
    mu_a, mu_b = a.double().mean(0).numpy(), b.double().mean(0).numpy()
    s_a, s_b = np.cov(a.double().numpy(), rowvar=False), np.cov(b.double().numpy(), rowvar=False)
    reference = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_with_fewer_samples_than_dimensions() -> None:
    a = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))  # singular covariance
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a[:5]) >= 0


def test_mean_pairwise_distance_by_hand() -> None:
    points = torch.tensor([[0.0], [1.0], [3.0]])  # pairwise distances 1, 3, 2
    assert mean_pairwise_distance(points) == pytest.approx(2.0)
    assert mean_pairwise_distance(points, chunk=1) == pytest.approx(2.0)
    labels = torch.tensor([0, 0, 1])  # class 0: distance 1; class 1 has one sample and is skipped
    assert class_diversity(points, labels, num_classes=3) == pytest.approx(1.0)


def test_classifier_score_bounds() -> None:
    assert classifier_score(torch.zeros(20, 10)) == pytest.approx(1.0)  # uniform p(y|x): no information
    confident = torch.eye(10).repeat(3, 1) * 100  # each class predicted with certainty, equally often
    assert classifier_score(confident) == pytest.approx(10.0, rel=1e-6)


# --- cache ----------------------------------------------------------------------------------------


def test_cache_round_trip_reuses_the_file(digits: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been reused")

    monkeypatch.setattr(classifier_module, "train_classifier", no_training)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, test_acc = load_or_train_classifier(
            "digits", digits.cache_dir, digits.cache_dir, progress=False, train_steps=DIGITS_TRAIN_STEPS
        )
    assert test_acc == digits.test_acc
    assert not model.training
    assert torch.equal(classifier_stats(model, digits.test.images).logits, digits.stats.logits)


def test_corrupt_cache_is_retrained_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return train_classifier(*args, **kwargs)

    monkeypatch.setattr(classifier_module, "train_classifier", counting)
    cache_path(tmp_path, "digits").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="retraining"):
        _, acc = load_or_train_classifier("digits", tmp_path, tmp_path, progress=False, train_steps=10)
    assert calls == [1] and 0 <= acc <= 1
    _, again = load_or_train_classifier("digits", tmp_path, tmp_path, progress=False, train_steps=10)  # now cached
    assert calls == [1] and again == acc
    with pytest.warns(UserWarning, match="config"):  # another training config: retrain, do not reuse
        load_or_train_classifier("digits", tmp_path, tmp_path, progress=False, train_steps=11)
    assert calls == [1, 1]


# --- real MNIST (skips where ../shared/data is absent) ----------------------------------------------


@pytest.mark.skipif(not (DATA_DIR / "MNIST").exists(), reason=f"MNIST not found under {DATA_DIR}")
def test_short_mnist_training_learns() -> None:
    train = load_dataset("mnist", DATA_DIR, train=True, download=False)
    test = load_dataset("mnist", DATA_DIR, train=False, download=False)
    model = train_classifier(train, train_steps=40, progress=False)
    assert accuracy(classifier_stats(model, test.images[:2000]).preds, test.labels[:2000]) > 0.5  # chance: 0.1
