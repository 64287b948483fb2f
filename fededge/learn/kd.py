"""The knowledge-distillation loss of the design source (DESIGN.md, "The KD loss").

    J(θ) = (1 − α)·H(y, p_s) + α·T²·H(p_t, p_s)

where p_t and p_s are the teacher's and the student's softmax at temperature T, and H(a, b) =
−Σ a·ln b is cross-entropy. DESIGN softens p_s at T in *both* terms (its worked example plugs
one p_s into both); Hinton et al. use T = 1 in the hard term. We follow DESIGN. With α = 1 (pure
distillation of a consensus) or T = 1 the two readings coincide. The T² factor keeps the soft
term's gradient scale independent of T.

Teachers are given as logits. Consensus from probability-space aggregators arrives as
log-probabilities; those are valid logits, since softmax(ln p / T) = p^(1/T) / Σ p^(1/T) (and
= p at T = 1).

`kd_terms` / `kd_objective` are the numpy, summed, given-probabilities form used to check the
design source's worked example; `kd_loss` is the batch-mean torch form used for training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over the last axis; higher T gives a flatter distribution."""
    return torch.softmax(logits / temperature, dim=-1)


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Batch mean of J: (1 − α)·H(y, p_s) + α·T²·H(p_t, p_s), both p softened at T.

    `labels=None` is pure distillation and requires α = 1; `teacher_logits=None` is plain
    cross-entropy and requires α = 0 (use T = 1 for the usual CE). No gradient flows into the
    teacher.
    """
    _check_weights(alpha, temperature, labels is not None, teacher_logits is not None)
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    loss = student_logits.new_zeros(())
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.nll_loss(log_ps, labels)
    if alpha > 0.0:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits have shape {tuple(teacher_logits.shape)} but the student's "
                f"have {tuple(student_logits.shape)}; both must be (batch, classes)"
            )
        p_t = soften(teacher_logits.detach(), temperature)
        soft = -(p_t * log_ps).sum(dim=1).mean()
        loss = loss + alpha * temperature**2 * soft
    return loss


def _check_weights(alpha: float, temperature: float, has_labels: bool, has_teacher: bool) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (got {alpha}); 1 = pure distillation")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); try 1-4")
    if not has_labels and alpha < 1.0:
        raise ValueError(
            f"labels=None means pure distillation, which needs alpha=1 (got {alpha}); "
            "pass the labels or set alpha=1"
        )
    if not has_teacher and alpha > 0.0:
        raise ValueError(
            f"teacher_logits=None means plain cross-entropy, which needs alpha=0 (got {alpha}); "
            "pass teacher logits or set alpha=0"
        )


def kd_terms(
    y_onehot: np.ndarray, p_teacher: np.ndarray, p_student: np.ndarray
) -> tuple[float, float]:
    """(H(y, p_s), H(p_t, p_s)) summed over samples, natural log, from given probabilities
    (already softened). Terms with zero weight contribute 0 even where p_s is 0."""
    y_onehot = np.asarray(y_onehot, dtype=np.float64)
    p_teacher = np.asarray(p_teacher, dtype=np.float64)
    p_student = np.asarray(p_student, dtype=np.float64)
    if not (y_onehot.shape == p_teacher.shape == p_student.shape) or y_onehot.ndim != 2:
        raise ValueError(
            "y_onehot, p_teacher and p_student must share one (samples, classes) shape; got "
            f"{y_onehot.shape}, {p_teacher.shape}, {p_student.shape}"
        )
    return _cross_entropy_sum(y_onehot, p_student), _cross_entropy_sum(p_teacher, p_student)


def _cross_entropy_sum(weights: np.ndarray, p: np.ndarray) -> float:
    with np.errstate(divide="ignore"):
        log_p = np.log(np.where(weights > 0, p, 1.0))
    return float(-(weights * log_p).sum())


def kd_objective(h_hard: float, h_soft: float, alpha: float, temperature: float) -> float:
    """J = (1 − α)·h_hard + α·T²·h_soft (sum or mean, as the terms are)."""
    return (1.0 - alpha) * h_hard + alpha * temperature**2 * h_soft


def label_prior(y: np.ndarray, num_classes: int) -> np.ndarray:
    """A client's label distribution, for logit adjustment. Classes absent locally get the
    rarest present class's share (then all are renormalised): log 0 would make the adjusted
    loss ignore them entirely, and "as rare as the rarest class seen" is the mildest claim."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes).astype(np.float64)
    floor = counts[counts > 0].min() if (counts > 0).any() else 1.0
    counts = np.where(counts > 0, counts, floor)
    return counts / counts.sum()


def logit_adjusted_ce(student_logits: torch.Tensor, labels: torch.Tensor,
                      log_prior: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy on logits + τ·ln prior (logit adjustment, as FedLC calibrates local
    label bias): the frequent local classes get a head start in the loss, so the student need
    not learn the client's skew into its own logits, which keeps them agreeable with the
    consensus while the labels still anchor it."""
    return F.cross_entropy(student_logits + tau * log_prior, labels)


def not_true_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """FedNTD's not-true-class distillation: T²·KL(p_t ‖ p_s) over the classes other than each
    sample's label (both softened at T). Training on labels then moves the true class freely
    while what the student knew about the other classes (here: after absorbing a consensus)
    is kept."""
    keep = torch.ones_like(student_logits, dtype=torch.bool)
    keep[torch.arange(len(labels)), labels] = False
    rows, others = len(labels), student_logits.shape[1] - 1
    log_ps = F.log_softmax(student_logits[keep].view(rows, others) / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach()[keep].view(rows, others) / temperature, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()
    return temperature**2 * kl
