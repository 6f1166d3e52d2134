"""Segmentation losses shared by the refseg methods.

Every loss takes foreground *logits* (sigmoid is applied inside) and binary targets of the same
shape `(batch_size, ...)` (usually `(B, H, W)`), is differentiable with respect to the logits, and
accepts `reduction` in `{"mean", "sum", "none"}`:

| loss | `"none"` gives | `"mean"` | `"sum"` |
| --- | --- | --- | --- |
| `dice_loss` | `(B,)` per-sample dice loss | mean over samples | sum over samples |
| `sigmoid_focal_loss` | `(B,)` per-sample mean over pixels | mean over every element | sum over every element |
| `bce_loss` | `(B,)` per-sample mean over pixels | mean over every element | sum over every element |
| `instance_contrastive_loss` | `(G,)` eq. 8 per image | mean over images | sum over images |

Who uses what: RISCLIP (focal + dice), CRIS (BCE), RISAM (focal + dice), Prompt-RIS (BCE + dice +
instance contrastive).
"""

from typing import Optional

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError(
            f"`logits` and `targets` must be torch tensors, got {type(logits).__name__} and {type(targets).__name__}"
        )
    if logits.dim() < 1:
        raise ValueError(f"`logits` must have a batch dimension (B, ...), got shape {tuple(logits.shape)}")
    if logits.shape != targets.shape:
        raise ValueError(
            f"`targets` must have the shape of `logits`: got targets {tuple(targets.shape)} "
            f"and logits {tuple(logits.shape)}"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce_elementwise(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce an element-wise loss (B, ...): mean/sum over all elements, or per-sample means (B,)."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss.reshape(loss.shape[0], -1).mean(dim=1)


def dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, eps: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """Soft dice loss on sigmoid probabilities.

    Per sample: `1 - (2 * sum(p * t) + eps) / (sum(p) + sum(t) + eps)` with `p = sigmoid(logits)`,
    sums over every non-batch element.

    Args:
        logits (`torch.Tensor` of shape `(B, ...)`): foreground logits.
        targets (`torch.Tensor` of shape `(B, ...)`): binary (or soft) targets in [0, 1].
        eps (`float`): smoothing added to numerator and denominator (1.0, as in V-Net/DETR code).
        reduction (`str`): `"mean"` / `"sum"` over samples, or `"none"` for the `(B,)` vector.
    """
    _check_inputs(logits, targets)
    _check_reduction(reduction)
    probs = logits.sigmoid().reshape(logits.shape[0], -1)
    targets = targets.to(probs.dtype).reshape(targets.shape[0], -1)
    numerator = 2 * (probs * targets).sum(dim=1) + eps
    denominator = probs.sum(dim=1) + targets.sum(dim=1) + eps
    loss = 1 - numerator / denominator  # (B,)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: Optional[float] = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al., 2017): `-alpha_t * (1 - p_t) ** gamma * log(p_t)` per element.

    `p_t = p` where the target is 1 and `1 - p` where it is 0; `alpha_t = alpha` for positives and
    `1 - alpha` for negatives (soft targets interpolate linearly). `log(p_t)` is taken from
    `binary_cross_entropy_with_logits`, which is stable for large |logits|.

    Args:
        logits (`torch.Tensor` of shape `(B, ...)`): foreground logits.
        targets (`torch.Tensor` of shape `(B, ...)`): targets in [0, 1].
        alpha (`float` or `None`): weight of positives in [0, 1]; `None` disables the weighting.
        gamma (`float`): focusing exponent (>= 0); 0 gives (alpha-weighted) BCE.
        reduction (`str`): `"mean"` over every element, `"sum"` over every element, or `"none"`
            for per-sample means `(B,)`.
    """
    _check_inputs(logits, targets)
    _check_reduction(reduction)
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1] or None, got {alpha}")
    if gamma < 0:
        raise ValueError(f"`gamma` must be >= 0, got {gamma}")
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log(p_t)
    probs = logits.sigmoid()
    p_t = probs * targets + (1 - probs) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce_elementwise(loss, reduction)


def bce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    pos_weight: Optional[float] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid binary cross-entropy per element (`binary_cross_entropy_with_logits`).

    Args:
        logits (`torch.Tensor` of shape `(B, ...)`): foreground logits.
        targets (`torch.Tensor` of shape `(B, ...)`): targets in [0, 1].
        pos_weight (`float` or `torch.Tensor`, *optional*): weight of the positive term,
            `-(pos_weight * t * log p + (1 - t) * log(1 - p))`.
        reduction (`str`): `"mean"` / `"sum"` over every element, or `"none"` for per-sample
            means `(B,)`.
    """
    _check_inputs(logits, targets)
    _check_reduction(reduction)
    if pos_weight is not None and not isinstance(pos_weight, torch.Tensor):
        pos_weight = torch.tensor(float(pos_weight), dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(
        logits, targets.to(logits.dtype), pos_weight=pos_weight, reduction="none"
    )
    return _reduce_elementwise(loss, reduction)


def _same_instance(targets: torch.Tensor) -> torch.Tensor:
    """`Y` of eq. 8 from target masks (b, K): 1 where two binary targets are identical and not empty, and on
    the diagonal. Two no-target rows (empty targets, generalized RIS) are not one instance: each row with no
    referent is its own, so ICL pushes its prediction apart from every other row's mask."""
    binary = targets > 0.5
    identical = (binary[:, None, :] == binary[None, :, :]).all(dim=-1)
    present = binary.any(dim=-1)
    diagonal = torch.eye(binary.shape[0], dtype=torch.bool, device=binary.device)
    return ((identical & present[:, None] & present[None, :]) | diagonal).to(targets.dtype)


def _hard_iou(probs: torch.Tensor, targets: torch.Tensor, threshold: float) -> torch.Tensor:
    """IoU of (probs > threshold) with (targets > 0.5) per row (N, K) -> (N,); empty/empty is 1."""
    pred = probs > threshold
    gt = targets > 0.5
    inter = (pred & gt).sum(dim=1).to(probs.dtype)
    union = (pred | gt).sum(dim=1).to(probs.dtype)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def instance_contrastive_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group_ids: Optional[torch.Tensor] = None,
    *,
    instance_ids: Optional[torch.Tensor] = None,
    iou_threshold: float = 0.5,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> torch.Tensor:
    """Instance Contrastive Learning loss of Prompt-RIS (Sec. 3.3, eqs. 7-8).

    For the b sentences of one image with predicted masks `S_i = sigmoid(logits_i)`:

    - eq. 7, the soft dice overlap of every pair: `O_ij = 2 sum_k S_i^k S_j^k / (sum_k (S_i^k)^2 +
      sum_k (S_j^k)^2)`, in [0, 1]; `O_ii = 1`.
    - eq. 8, an IoU-weighted binary cross-entropy on the overlaps:
      `L_icl = -1/b^2 sum_i sum_j w_i (Y_ij log O_ij + (1 - Y_ij) log(1 - O_ij))`,
      where `Y_ij = 1` when sentences i and j refer to the same instance and `w_i` is the IoU of
      the i-th predicted mask with its ground truth.

    Decisions where the paper is silent or the extracted text is ambiguous:

    - Sign: eq. 8 as extracted reads `1/b^2 sum ...`; we use the minus sign of a cross-entropy so
      that the loss is >= 0 and is minimised by overlapping same-instance masks and disjoint
      different-instance masks, which is what the text says it encourages.
    - `w_i` is the IoU of the *binarised* prediction (`sigmoid > iou_threshold`) with the target,
      computed without gradient (it is a confidence weight, not a training signal); a sample
      whose prediction and target are both empty gets `w_i = 1`.
    - `Y_ij` comes from `instance_ids` when given; otherwise two sentences are the same instance
      when their binary target masks are identical (true within one image for RefCOCO-style data,
      where every sentence of an object shares the object's mask) and not empty: two sentences with
      no referent (generalized RIS) are two instances, so each no-target prediction is pushed apart
      from every other mask of its image.
    - The diagonal (i = j) is kept as in the sums of eq. 8; since `O_ii = 1` and `Y_ii = 1`, it
      contributes exactly 0 but counts in the `1/b^2` normaliser. A one-sentence image gives 0.
    - Numerics: the denominator of eq. 7 is clamped at `eps`, and `log O` / `log(1 - O)` take
      their argument clamped at `eps`.
    - Several images in one batch: `group_ids` says which image each sample belongs to; pairs are
      only formed within an image, eq. 8 is evaluated per image with its own b.

    Args:
        logits (`torch.Tensor` of shape `(N, ...)`): mask logits (e.g. `(N, H, W)`), one per sentence;
            the same loss is applied to the coarse (CLIP) and the final (SAM) masks.
        targets (`torch.Tensor` of shape `(N, ...)`): binary ground-truth masks at the logits' size.
        group_ids (`torch.Tensor` of shape `(N,)`, *optional*): image index of each sample; all
            samples belong to one image when omitted.
        instance_ids (`torch.Tensor` of shape `(N,)`, *optional*): object id of each sample
            (e.g. `ann_id`), defining `Y`; derived from `targets` when omitted.
        iou_threshold (`float`): probability threshold used to binarise predictions for `w_i`.
        eps (`float`): numerical floor, see above.
        reduction (`str`): `"none"` gives eq. 8 per image, shape `(G,)` ordered by sorted group id;
            `"mean"` / `"sum"` average / add them.

    Returns:
        `torch.Tensor`: the loss, scalar or `(G,)`.
    """
    _check_inputs(logits, targets)
    _check_reduction(reduction)
    num = logits.shape[0]
    for name, ids in (("group_ids", group_ids), ("instance_ids", instance_ids)):
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.shape != (num,)):
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"`{name}` must be a tensor of shape ({num},) matching `logits`, got {shape}")
    if group_ids is None:
        group_ids = torch.zeros(num, dtype=torch.long, device=logits.device)

    probs = logits.sigmoid().reshape(num, -1)  # (N, K)
    flat_targets = targets.to(probs.dtype).reshape(num, -1)
    with torch.no_grad():
        weights = _hard_iou(probs.detach(), flat_targets, iou_threshold)  # (N,) w_i

    losses = []
    for group in torch.unique(group_ids):
        index = (group_ids == group).nonzero(as_tuple=True)[0]
        s = probs[index]  # (b, K)
        b = s.shape[0]
        gram = s @ s.t()  # (b, b): sum_k S_i^k S_j^k
        squares = torch.diagonal(gram)  # (b,): sum_k (S_i^k)^2
        overlap = 2 * gram / (squares[:, None] + squares[None, :]).clamp_min(eps)  # eq. 7
        if instance_ids is None:
            same = _same_instance(flat_targets[index])
        else:
            ids = instance_ids[index]
            same = (ids[:, None] == ids[None, :]).to(probs.dtype)
        log_o = torch.log(overlap.clamp_min(eps))
        log_not_o = torch.log((1 - overlap).clamp_min(eps))
        pair_terms = same * log_o + (1 - same) * log_not_o  # (b, b)
        losses.append(-(weights[index][:, None] * pair_terms).sum() / b**2)  # eq. 8
    per_group = torch.stack(losses)
    if reduction == "mean":
        return per_group.mean()
    if reduction == "sum":
        return per_group.sum()
    return per_group


__all__ = ["bce_loss", "dice_loss", "instance_contrastive_loss", "sigmoid_focal_loss"]
