"""Losses against values worked out by hand on tiny 2-D batches, and the direction their gradients move styles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ootd.model.losses import batch_hard_triplet_loss, make_loss, pairwise_contrastive_loss, supcon_loss

# Three unit vectors in the plane: cos(e0, e1) = 0.6, cos(e0, e2) = 0, cos(e1, e2) = 0.8.
E3 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
L3 = torch.tensor([0, 0, 1])


def test_supcon_matches_hand_computation():
    t = 0.5
    # Anchor 0: positive e1 (cos .6), other e2 (cos 0). Anchor 1: positive e0 (.6), other e2 (.8). Anchor 2: none.
    l0 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(0.0 / t)))
    l1 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(0.8 / t)))
    expected = (l0 + l1) / 2  # anchor 2 has no positive and is skipped, not counted as zero
    assert expected == pytest.approx(0.588149, abs=1e-5)
    assert supcon_loss(E3, L3, temperature=t).item() == pytest.approx(expected, abs=1e-5)


def test_supcon_averages_over_positives():
    # Three identical same-style vectors: each anchor has 2 positives, each with probability 1/2.
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert supcon_loss(emb, torch.tensor([4, 4, 4]), temperature=0.1).item() == pytest.approx(math.log(2), abs=1e-5)


def test_pairwise_matches_hand_computation():
    # d = 1 - cos. Pairs: (0,1) same, d=.4 -> .16; (0,2) different, d=1 >= margin -> 0; (1,2) different, d=.2 -> .09.
    expected = (0.16 + 0.0 + 0.09) / 3
    assert pairwise_contrastive_loss(E3, L3, margin=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_batch_hard_triplet_matches_hand_computation():
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1, 1])
    # Distances: d01=.4 d02=1 d03=.2 d12=.2 d13=.04 d23=.4.
    # a0: pos .4, nearest neg .2  -> .4; a1: pos .4, nearest neg .04 -> .56; a2: pos .4, neg .2 -> .4; a3: .56.
    expected = (0.4 + 0.56 + 0.4 + 0.56) / 4
    assert batch_hard_triplet_loss(emb, labels, margin=0.2).item() == pytest.approx(expected, abs=1e-6)
    # A large enough gap makes every anchor satisfied.
    far = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    assert batch_hard_triplet_loss(far, labels, margin=0.2).item() == 0.0


def test_unnormalised_input_gives_the_same_loss():
    scaled = E3 * torch.tensor([[3.0], [0.5], [2.0]])
    for fn in (supcon_loss, pairwise_contrastive_loss, batch_hard_triplet_loss):
        assert fn(scaled, L3).item() == pytest.approx(fn(E3, L3).item(), abs=1e-6)


def _swapped_pairwise(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """The original team's defect (DESIGN §1): same- and different-style terms exchanged."""
    z = F.normalize(emb, dim=1)
    i, j = torch.triu_indices(len(z), len(z), offset=1)
    d = 1 - (z[i] * z[j]).sum(dim=1)
    same = labels[i] == labels[j]
    return torch.where(same, F.relu(margin - d).pow(2), d.pow(2)).mean()


def _cos_after_step(loss_fn, emb: torch.Tensor, labels: torch.Tensor, a: int, b: int, lr: float = 0.05) -> float:
    x = emb.clone().requires_grad_(True)
    loss_fn(x, labels).backward()
    stepped = (x - lr * x.grad).detach()
    return F.cosine_similarity(stepped[a], stepped[b], dim=0).item()


def test_pairwise_gradient_pulls_same_style_together_and_swapped_pushes_apart():
    # Two-item batches isolate one term each. Same style: cos .6 (d=.4 < margin). Different style: cos .8 (d=.2).
    same_pair, same_labels = E3[:2], torch.tensor([0, 0])
    diff_pair, diff_labels = E3[1:], torch.tensor([0, 1])
    before_same, before_diff = 0.6, 0.8
    assert _cos_after_step(pairwise_contrastive_loss, same_pair, same_labels, 0, 1) > before_same + 1e-4
    assert _cos_after_step(pairwise_contrastive_loss, diff_pair, diff_labels, 0, 1) < before_diff - 1e-4
    # The defect moves both pairs the wrong way: same style apart, different styles together.
    assert _cos_after_step(_swapped_pairwise, same_pair, same_labels, 0, 1) < before_same - 1e-4
    assert _cos_after_step(_swapped_pairwise, diff_pair, diff_labels, 0, 1) > before_diff + 1e-4


def test_pairwise_gradient_in_a_mixed_batch_tightens_styles():
    # All three items together: the same-style pair gets closer, the close different-style pair farther apart.
    assert _cos_after_step(pairwise_contrastive_loss, E3, L3, 0, 1) > 0.6 + 1e-4
    assert _cos_after_step(pairwise_contrastive_loss, E3, L3, 1, 2) < 0.8 - 1e-4


@pytest.mark.parametrize("name", ["supcon", "pairwise", "triplet"])
def test_every_loss_pulls_same_style_together(name):
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1, 1])
    loss_fn = make_loss(name, temperature=0.1, margin=0.5)
    before = F.cosine_similarity(emb[0], emb[1], dim=0).item()
    assert _cos_after_step(loss_fn, emb, labels, 0, 1) > before + 1e-4


def test_make_loss_binds_hyper_parameters():
    assert make_loss("supcon", temperature=0.5)(E3, L3).item() == pytest.approx(supcon_loss(E3, L3, 0.5).item())
    assert make_loss("pairwise", margin=0.5)(E3, L3).item() == pytest.approx((0.16 + 0.09) / 3, abs=1e-6)
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    assert make_loss("triplet", margin=0.2)(emb, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(0.48, abs=1e-6)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown loss 'arcface'"):
        make_loss("arcface")
    with pytest.raises(ValueError, match="temperature"):
        make_loss("supcon", temperature=0.0)
    with pytest.raises(ValueError, match="margin"):
        make_loss("triplet", margin=-0.1)
    with pytest.raises(ValueError, match="labels must be"):
        supcon_loss(E3, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="embeddings must be"):
        pairwise_contrastive_loss(torch.ones(3), L3)


def test_batches_without_pairs_give_zero_that_still_backpropagates():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    distinct = torch.tensor([0, 1])
    for fn in (supcon_loss, batch_hard_triplet_loss):
        loss = fn(x, distinct)
        assert loss.item() == 0.0
        loss.backward()  # DDP needs a graph even when nothing in the batch is comparable
    single = pairwise_contrastive_loss(x[:1], distinct[:1])
    assert single.item() == 0.0


def test_bf16_embeddings_give_a_float32_loss():
    loss = supcon_loss(E3.to(torch.bfloat16), L3, temperature=0.5)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.588149, abs=2e-2)
