"""Sample-quality metrics as plain functions of tensors: accuracy, Frechet distance, diversity.

Guidance trades diversity for fidelity (Ho & Salimans 2022, Fig. 4-5): as the scale s grows, the
classifier's accuracy on the requested labels rises while the within-class spread of features
falls, and the Frechet distance to real data first improves, then degrades. These functions
measure those three things in the feature space of `classifier.Classifier` (or any network).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .classifier import Classifier


def accuracy(logits_or_preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions. Takes logits (N, K) (argmax is taken) or predictions (N,)."""
    preds = logits_or_preds.argmax(dim=1) if logits_or_preds.ndim == 2 else logits_or_preds  # (N,)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
    return (preds.cpu() == labels.cpu()).double().mean().item()


def _mean_cov(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) -> mean (D,) and unbiased covariance (D, D), in float64."""
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {tuple(feats.shape)}")
    x = feats.detach().double().cpu()
    mu = x.mean(dim=0)  # (D,)
    xc = x - mu  # (N, D)
    return mu, xc.T @ xc / (len(x) - 1)  # (D,), (D, D)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix, via S = V diag(w) V^T."""
    w, v = torch.linalg.eigh(s)  # (D,), (D, D)
    return (v * w.clamp(min=0).sqrt()) @ v.T  # V diag(sqrt w) V^T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID):

        d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}).

    S_a S_b is not symmetric, but it is similar to M = S_a^{1/2} S_b S_a^{1/2}, which is symmetric PSD,
    so Tr (S_a S_b)^{1/2} = sum_i sqrt(lambda_i(M)): two symmetric eigendecompositions in float64,
    no complex sqrtm. Tiny negative round-off is clamped to 0.
    feats_a (N, D), feats_b (M, D) with N, M >= 2."""
    if feats_a.shape[1:] != feats_b.shape[1:]:
        raise ValueError(f"feature sizes differ: {tuple(feats_a.shape)} vs {tuple(feats_b.shape)}")
    mu_a, s_a = _mean_cov(feats_a)
    mu_b, s_b = _mean_cov(feats_b)
    root_a = _sqrt_psd(s_a)  # (D, D)
    m = root_a @ s_b @ root_a  # (D, D)
    m = (m + m.T) / 2  # symmetric up to round-off; make it exactly so for eigvalsh
    tr_sqrt = torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * tr_sqrt
    return max(d2.item(), 0.0)


def mean_pairwise_distance(feats: torch.Tensor, chunk: int = 1024) -> float:
    """Mean Euclidean distance over the N (N - 1) ordered pairs i != j of feats (N, D), N >= 2.

    Computed exactly (no ||a||^2 + ||b||^2 - 2ab shortcut), in float64 and in row chunks, so
    identical features give exactly 0 and memory stays at chunk x N."""
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {tuple(feats.shape)}")
    x = feats.detach().double().cpu()
    total = sum(
        torch.cdist(rows, x, compute_mode="donot_use_mm_for_euclid_dist").sum()  # (chunk, N) -> ()
        for rows in x.split(chunk)
    )
    return (total / (len(x) * (len(x) - 1))).item()  # the diagonal contributes 0


def per_class_diversity(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes,) mean pairwise feature distance within each class; NaN where a class has < 2 samples."""
    labels = labels.cpu()
    out = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    for k in range(num_classes):
        members = feats[labels == k]  # (N_k, D)
        if len(members) >= 2:
            out[k] = mean_pairwise_distance(members)
    return out


def class_diversity(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean over classes (those with >= 2 samples) of the mean within-class pairwise feature distance.

    0 when every class collapses to one point. Report it relative to real data (generated / real):
    the absolute value depends on the feature extractor."""
    per_class = per_class_diversity(feats, labels, num_classes)
    if per_class.isnan().all():
        raise ValueError("class_diversity needs at least one class with two or more samples")
    return per_class.nanmean().item()


def classifier_score(logits: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the set: the Inception Score
    (Salimans et al. 2016) with this project's classifier. Between 1 and num_classes; high when
    each sample is confidently one class and all classes appear. logits (N, K)."""
    log_p = torch.log_softmax(logits.detach().double().cpu(), dim=1)  # (N, K) log p(y|x)
    log_marginal = torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(len(log_p)), dtype=torch.float64))
    kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1)  # (N,)
    return kl.mean().exp().item()


@dataclass
class ClassifierStats:
    """The classifier's view of a set of N images."""

    logits: torch.Tensor  # (N, K) float32, on the CPU
    features: torch.Tensor  # (N, D) float32, on the CPU

    @property
    def preds(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)  # (N,)


@torch.no_grad()
def classifier_stats(classifier: Classifier, images: torch.Tensor, batch_size: int = 512) -> ClassifierStats:
    """Run `classifier.features` and its `head` over images (N, C, H, W) in batches on the
    classifier's device. The classifier should be in eval mode (batch norm uses running stats)."""
    if len(images) == 0:
        raise ValueError("classifier_stats needs at least one image")
    device = next(classifier.parameters()).device
    logits, feats = [], []
    for batch in images.split(batch_size):
        f = classifier.features(batch.to(device))  # (b, D)
        feats.append(f.float().cpu())
        logits.append(classifier.head(f).float().cpu())  # (b, K)
    return ClassifierStats(logits=torch.cat(logits), features=torch.cat(feats))
