"""What recovery training minimises and validates: logit distillation for causal LMs ("lm"),
hidden-state distillation for encoders ("hidden"), and the validation metric of each.

>>> logits = torch.zeros(2, 3, 5)  # uniform over 5 tokens; the teacher agrees, so KL = 0
>>> round(float(distillation_loss(logits, logits, torch.zeros(2, 3, dtype=torch.long))), 4)  # (1 − α)·ln 5
0.8047
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import unwrap
from .errors import KronfactError
from .evaluate import hidden_states, lm_logits, mean_pool, model_context, perplexity

if TYPE_CHECKING:  # a type only: train imports this module
    from .train import TrainConfig


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor,
                      alpha: float = 0.5, temperature: float = 2.0) -> Tensor:
    """``(1 − α)·CE(student, targets) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``.

    Logits (..., vocab), targets (...) of token ids; both terms are means over positions, in float32.
    With ``teacher_logits`` None (or α = 0) it is the plain cross-entropy.
    """
    s = student_logits.flatten(0, -2).float()
    ce = F.cross_entropy(s, targets.flatten())
    if teacher_logits is None or alpha == 0:
        return ce
    t = teacher_logits.flatten(0, -2).float()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean")
    return (1 - alpha) * ce + alpha * temperature**2 * kl


def hidden_distillation_loss(student_hidden: Tensor, teacher_hidden: Tensor, mse: float = 1.0,
                             cosine: float = 1.0) -> Tensor:
    """``mse·mean((h_s − h_t)²) + cosine·mean(1 − cos(pool(h_s), pool(h_t)))`` for (batch, seq, dim) states."""
    s, t = student_hidden.float(), teacher_hidden.float()
    loss = s.new_zeros(())
    if mse:
        loss = loss + mse * F.mse_loss(s, t)
    if cosine:
        loss = loss + cosine * (1 - F.cosine_similarity(mean_pool(s), mean_pool(t), dim=-1)).mean()
    return loss


def resolve_objective(model: nn.Module, objective: str) -> str:
    """"lm" for causal LMs (class name ending in ForCausalLM / LMHeadModel), "hidden" otherwise."""
    if objective != "auto":
        return objective
    name = type(unwrap(model)).__name__
    return "lm" if name.endswith(("ForCausalLM", "LMHeadModel")) else "hidden"


def context_of(model: nn.Module) -> int:
    return model_context(unwrap(model))


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    """A ValueError when ``seq_len`` exceeds the positions the model has (skipped when its config does
    not tell): a longer window would fail deep inside the position embedding."""
    try:
        limit = context_of(model)
    except ValueError:
        return
    if seq_len > limit:
        raise KronfactError(f"TrainConfig.seq_len={seq_len} is longer than the model's context of {limit} positions: "
                            f"set seq_len to at most {limit} (or leave it None to use the model's context)")


class TrainingObjective:
    """One micro-batch's loss, and the validation metrics, for an objective."""

    def __init__(self, kind: str, config: TrainConfig, teacher: nn.Module | None):
        self.kind, self.config, self.teacher = kind, config, teacher

    def window(self, seq_len: int) -> int:
        return seq_len + 1 if self.kind == "lm" else seq_len

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        c = self.config
        if self.kind == "lm":
            x, y = batch[:, :-1], batch[:, 1:]
            logits = lm_logits(model, x)
            teacher = None
            if c.distill:
                with torch.no_grad():
                    teacher = lm_logits(self.teacher, x)
            return distillation_loss(logits, teacher, y, c.alpha if c.distill else 0.0, c.temperature)
        with torch.no_grad():
            target = hidden_states(self.teacher, batch)
        return hidden_distillation_loss(hidden_states(model, batch), target, c.hidden_mse, c.hidden_cosine)

    @torch.no_grad()
    def validate(self, model: nn.Module, ids: Tensor, seq_len: int, device: torch.device) -> dict[str, float]:
        """lm: val = mean NLL over non-overlapping windows (token-weighted), val_ppl = exp(val).
        hidden: val = the distillation loss, val_cosine = mean cos of mean-pooled embeddings to the teacher."""
        was_training = model.training
        model.eval()
        try:
            if self.kind == "lm":
                ppl = perplexity(model, ids, context=seq_len, stride=seq_len, batch_size=self.config.batch_size)
                return {"val": math.log(ppl), "val_ppl": ppl}
            n = ids.numel() // seq_len
            if n == 0:
                raise KronfactError(f"validation needs at least seq_len={seq_len} tokens, got {ids.numel()}")
            windows = ids[:n * seq_len].view(n, seq_len)
            loss_sum, cos_sum = 0.0, 0.0
            for chunk in windows.split(self.config.batch_size):
                chunk = chunk.to(device)
                s, t = hidden_states(model, chunk), hidden_states(self.teacher, chunk)
                c = self.config
                loss_sum += float(hidden_distillation_loss(s, t, c.hidden_mse, c.hidden_cosine)) * len(chunk)
                cos_sum += float(F.cosine_similarity(mean_pool(s.float()), mean_pool(t.float()), dim=-1).sum())
            return {"val": loss_sum / n, "val_cosine": cos_sum / n}
        finally:
            model.train(was_training)
