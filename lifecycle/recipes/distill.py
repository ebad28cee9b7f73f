"""Knowledge distillation: a frozen teacher's next-token distribution as the student's target.

Used by the pretrain recipe's `--distill-from` to make a speculative-decoding draft *of its target*:
the acceptance rate of a draft token is sum_x min(p(x), q(x)) = 1 - TV(p, q) (Leviathan et al. 2023,
Sec. 3.3), so a draft should be trained to match the target's distribution p, not the data's
(DistillSpec, Zhou et al. 2023, Sec. 4: on-policy or teacher-labelled data with a divergence to the
target). Here the divergence is the forward KL(p_teacher || q_student) on the teacher-forced
training blocks, the teacher's logits computed in the same batch under no_grad: no logit cache, and
resume stays exact because the frozen teacher is a deterministic function of the batch.

    loss = alpha * CE(labels, q) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

The T^2 keeps the soft term's gradient scale independent of T (Hinton et al. 2015, Sec. 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lifecycle.errors import ConfigError

if TYPE_CHECKING:
    from lifecycle.checkpoint import Checkpoint


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T)), in nats.

    Both logits are (..., vocab); every position counts (the last one too: the teacher has a
    distribution there even though the block has no label for it).
    """
    vocab = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # (positions, vocab)
    log_p = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # (positions, vocab)
    # kl_div(input=log q, target=log p, log_target) = sum p (log p - log q)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True) / log_q.shape[0]
    return kl * temperature**2


def mix_losses(ce: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * hard-label cross-entropy + (1 - alpha) * distillation term; alpha = 0 is pure distillation."""
    if alpha == 0:
        return kd
    return alpha * ce + (1 - alpha) * kd


class Teacher:
    """A frozen checkpoint whose logits train a student on the same batch.

    Call order: `Teacher.load(...)` once before training, `.to(device)`, then `.loss(...)` inside
    each micro-batch's forward; `.manifest_entry()` names it in the student's checkpoints.
    """

    def __init__(self, model: torch.nn.Module, reference: dict[str, Any], temperature: float, alpha: float):
        self.model = model.eval().requires_grad_(False)
        self.reference = reference  # path, manifest_sha256, recipe: goes into the student's manifest
        self.temperature = temperature
        self.alpha = alpha

    @classmethod
    def load(cls, path: str, student_tokenizer_dir: str, student_vocab_size: int, temperature: float, alpha: float,
             *, resumed: Checkpoint | None = None) -> "Teacher":
        """Load and check the teacher: same vocabulary and tokenizer as the student, and when resuming a
        run, the same teacher bytes it started with (else the loss curve would silently change)."""
        from lifecycle.checkpoint import load_checkpoint
        from lifecycle.tokenizer import tokenizer_hash

        ckpt = load_checkpoint(path)
        teacher_vocab = ckpt.config.get("vocab_size")
        if teacher_vocab != student_vocab_size:
            raise ConfigError(f"--distill-from {path}: teacher vocab_size {teacher_vocab} differs from the student's "
                              f"vocab_size {student_vocab_size}; distillation compares distributions token by token, "
                              "so both need the same vocabulary")
        teacher_tok, student_tok = tokenizer_hash(ckpt.path), tokenizer_hash(student_tokenizer_dir)
        if teacher_tok != student_tok:
            raise ConfigError(f"--distill-from {path}: teacher tokenizer (tokenizer.json sha256 {teacher_tok[:12]}) "
                              f"differs from the student's --tokenizer {student_tokenizer_dir} "
                              f"(sha256 {student_tok[:12]}); train the student with the teacher's tokenizer")
        saved = (resumed.manifest or {}).get("extra", {}).get("distilled_from") if resumed else None
        if saved and saved.get("manifest_sha256") != ckpt.manifest_sha256():
            raise ConfigError(f"{resumed.path} was distilled from a teacher whose manifest sha256 was "
                              f"{str(saved.get('manifest_sha256'))[:12]}, but --distill-from {path} now has "
                              f"{str(ckpt.manifest_sha256())[:12]}; resume with that teacher or use another --output-dir")
        model = ckpt.load_model(dtype=torch.float32)
        model.config.use_cache = False
        return cls(model, ckpt.reference(), temperature, alpha)

    def to(self, device: torch.device) -> "Teacher":
        self.model.to(device)
        return self

    def loss(self, student_logits: torch.Tensor, ce: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The distillation objective for one micro-batch; `ce` is the student's usual next-token loss."""
        with torch.no_grad():
            teacher_logits = self.model(input_ids=input_ids).logits  # (batch, seq, vocab)
        return mix_losses(ce, kd_loss(student_logits, teacher_logits, self.temperature), self.alpha)

    def manifest_entry(self) -> dict[str, Any]:
        return {**self.reference, "temperature": self.temperature, "alpha": self.alpha}
