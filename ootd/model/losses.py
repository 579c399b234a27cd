"""Contrastive losses over a batch of style embeddings (pure torch): SupCon, pairwise margin, batch-hard triplet."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_NAMES: tuple[str, ...] = ("supcon", "pairwise", "triplet")


def supcon_loss(emb: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the L_out form).

    For anchor i with positives P(i) (other items of its style) and all other items A(i):
    `L_i = -1/|P(i)| * sum_{p in P(i)} log(exp(s_ip / t) / sum_{a in A(i)} exp(s_ia / t))`, with s the cosine
    similarity. Anchors without a positive in the batch are skipped; the result is the mean over the others.

    Args:
        emb: (B, D) embeddings; they are L2-normalised here too, so unnormalised input still gives cosines.
        labels: (B,) integer style ids.
        temperature: softmax temperature t > 0.

    Returns:
        A scalar tensor; exactly zero (still attached to the graph) when no anchor has a positive.

    Raises:
        ValueError: for mismatched shapes or a non-positive temperature.
    """
    if temperature <= 0:
        raise ValueError(f"supcon temperature must be > 0, got {temperature}")
    z, same, self_mask = _prepare(emb, labels)
    logits = (z @ z.T) / temperature
    # The anchor itself is neither a positive nor part of the denominator.
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = same & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return z.sum() * 0.0
    # where() rather than multiply: the diagonal of log_prob is -inf and -inf * 0 would be NaN.
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -pos_log_prob[has_pos] / n_pos[has_pos]
    return per_anchor.mean()


def pairwise_contrastive_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Margin contrastive loss on cosine distance `d = 1 - cos` (Hadsell et al. 2006).

    Same-style pairs are pulled together with `d**2`; different-style pairs are pushed apart with
    `max(0, margin - d)**2`. The mean runs over all unordered pairs i < j. (The original team's version had the two
    terms swapped, which pulls different styles together; DESIGN §1.)

    Args:
        emb: (B, D) embeddings; L2-normalised here too.
        labels: (B,) integer style ids.
        margin: distance below which different-style pairs are penalised, >= 0.

    Returns:
        A scalar tensor; zero (attached to the graph) for a batch with fewer than two items.

    Raises:
        ValueError: for mismatched shapes or a negative margin.
    """
    if margin < 0:
        raise ValueError(f"pairwise margin must be >= 0, got {margin}")
    z, same, _ = _prepare(emb, labels)
    n = z.shape[0]
    if n < 2:
        return z.sum() * 0.0
    i, j = torch.triu_indices(n, n, offset=1, device=z.device)
    dist = 1.0 - (z[i] * z[j]).sum(dim=1)
    pair_same = same[i, j]
    per_pair = torch.where(pair_same, dist.pow(2), F.relu(margin - dist).pow(2))
    return per_pair.mean()


def batch_hard_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) on cosine distance `d = 1 - cos`.

    Each anchor takes its farthest same-style item and its nearest different-style item:
    `max(0, d(a, hardest positive) - d(a, hardest negative) + margin)`. Anchors lacking a positive or a negative in
    the batch are skipped; the result is the mean over the others. Cosine distance keeps the margin on the same
    scale as the pairwise loss's (both live in [0, 2]).

    Args:
        emb: (B, D) embeddings; L2-normalised here too.
        labels: (B,) integer style ids.
        margin: required gap between the hardest negative and the hardest positive, >= 0.

    Returns:
        A scalar tensor; zero (attached to the graph) when no anchor has both a positive and a negative.

    Raises:
        ValueError: for mismatched shapes or a negative margin.
    """
    if margin < 0:
        raise ValueError(f"triplet margin must be >= 0, got {margin}")
    z, same, self_mask = _prepare(emb, labels)
    dist = 1.0 - z @ z.T
    positives = same & ~self_mask
    negatives = ~same
    valid = positives.any(dim=1) & negatives.any(dim=1)
    if not bool(valid.any()):
        return z.sum() * 0.0
    # Distances lie in [0, 2], so -1 / 3 are safe "never chosen" fillers for max / min.
    hardest_pos = torch.where(positives, dist, torch.full_like(dist, -1.0)).max(dim=1).values
    hardest_neg = torch.where(negatives, dist, torch.full_like(dist, 3.0)).min(dim=1).values
    per_anchor = F.relu(hardest_pos - hardest_neg + margin)
    return per_anchor[valid].mean()


def make_loss(name: str, temperature: float = 0.1, margin: float = 0.5) -> LossFn:
    """The loss named in `train.loss`, bound to its hyper-parameter.

    Args:
        name: `supcon`, `pairwise` or `triplet`.
        temperature: used by `supcon`.
        margin: used by `pairwise` and `triplet`.

    Returns:
        `fn(emb, labels) -> scalar tensor`.

    Raises:
        ValueError: for an unknown name or an out-of-range hyper-parameter.
    """
    if name == "supcon":
        if temperature <= 0:
            raise ValueError(f"supcon temperature must be > 0, got {temperature}")
        return lambda emb, labels: supcon_loss(emb, labels, temperature=temperature)
    if name in ("pairwise", "triplet"):
        if margin < 0:
            raise ValueError(f"{name} margin must be >= 0, got {margin}")
        fn = pairwise_contrastive_loss if name == "pairwise" else batch_hard_triplet_loss
        return lambda emb, labels: fn(emb, labels, margin=margin)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")


def _prepare(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-norm float32 embeddings, the same-label matrix and the diagonal mask."""
    if emb.dim() != 2:
        raise ValueError(f"embeddings must be (batch, dim), got shape {tuple(emb.shape)}")
    if labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(f"labels must be ({emb.shape[0]},) to match the embeddings, got shape {tuple(labels.shape)}")
    # bf16 training: similarities and log-sum-exp are computed in float32 for stability.
    z = F.normalize(emb.float(), dim=1)
    labels = labels.to(z.device)
    same = labels[:, None] == labels[None, :]
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return z, same, self_mask
