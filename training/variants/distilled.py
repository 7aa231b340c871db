"""distilled: the fp32 parent (resnet18) teaches a small student (mobilenet_v3_small) from scratch.

    python -m training.variants.distilled artifacts/resnet18                  # -> variants/distilled
    python -m training.variants.distilled artifacts/resnet18 --kd-temperature 4 --kd-alpha 0.7 --kd-epochs 12

Loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, label).
The soft targets carry the teacher's "dark knowledge" (which wrong classes look alike); T^2 keeps their
gradient on the same scale as the cross-entropy term as T changes. For speed the teacher's logits are
computed once, on the un-augmented training images, and looked up by index while the student trains on
lightly jittered copies (--live-teacher runs the teacher on every augmented batch instead, ~2x slower
on CPU). The training loop is training.train.fit with this loss swapped in.

The student's weights load into torchvision's mobilenet_v3_small, so the variant keeps a state_dict
checkpoint next to its TorchScript artifact.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from handlers.loading import build_model
from training.evaluate import predict
from training.speed import count_params
from training.technique import Option, Source, Technique, Transformed, run_cli
from training.train import FitConfig, LossFn, bf16_autocast_helps, fit, seed_everything


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
            alpha: float) -> torch.Tensor:
    """Hinton et al. (2015): softened KL to the teacher plus hard-label cross-entropy."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    hard = F.cross_entropy(student, labels)
    return alpha * soft + (1.0 - alpha) * hard


def live_teacher_loss(teacher: torch.nn.Module, temperature: float, alpha: float, use_bf16: bool) -> LossFn:
    """The teacher sees the very same augmented batch as the student."""
    teacher.eval()

    def loss(x: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            teacher_logits = teacher(x)
        return kd_loss(student_logits, teacher_logits.float(), labels, temperature, alpha)

    return loss


class WithIndex(Dataset):
    """(image, label) -> (image, label, index), so a batch can look up its cached teacher logits."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.base[i]
        return image, label, i


def cached_teacher_loss(teacher_logits: torch.Tensor, temperature: float, alpha: float) -> LossFn:
    def loss(_x: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits[index.cpu()].to(student_logits.device), labels,
                       temperature, alpha)

    return loss


def set_bn_momentum(model: torch.nn.Module, momentum: float) -> None:
    """mobilenet_v3 ships BatchNorm momentum 0.01, tuned for ImageNet's ~500k steps. A from-scratch student
    on a small dataset takes a few hundred steps, so its running statistics would still mostly be the init
    values (mean 0, var 1) while the weights have moved on: eval mode then shrinks the signal to nothing and
    every input gets the same logits."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


class Distilled(Technique):
    name = "distilled"
    recipe = "knowledge_distillation"
    options = (
        Option("--student", "mobilenet_v3_small", "distilled: torchvision architecture of the student"),
        Option("--kd-temperature", 4.0, "distilled: softmax temperature T of the soft targets"),
        Option("--kd-alpha", 0.7, "distilled: weight of the soft-target term (0..1)"),
        Option("--kd-epochs", 12, "distilled: student training epochs"),
        Option("--kd-lr", 3e-3, "distilled: student learning rate"),
        Option("--live-teacher", False, "distilled: run the teacher on every augmented batch (slower)"),
    )
    batch_size = 32
    bn_momentum = 0.1

    def transform(self, source: Source, args: argparse.Namespace) -> Transformed:
        t, alpha = args.kd_temperature, args.kd_alpha
        if t <= 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"need --kd-temperature > 0 and 0 <= --kd-alpha <= 1, got {t} and {alpha}")
        parent, teacher, splits = source.parent, source.model, source.splits
        mean, std = parent.input.mean, parent.input.std
        device = torch.device("cpu")
        seed_everything(args.seed)
        student = build_model(args.student, parent.num_classes).to(memory_format=torch.channels_last)
        set_bn_momentum(student, self.bn_momentum)
        use_bf16 = bf16_autocast_helps(device)
        print(f"{self.name}: teacher {parent.architecture} ({count_params(teacher) / 1e6:.2f}M params) -> student "
              f"{args.student} ({count_params(student) / 1e6:.2f}M params, from scratch), T={t}, alpha={alpha}, "
              f"{args.kd_epochs} epochs")
        cfg = FitConfig(epochs=args.kd_epochs, batch_size=self.batch_size, lr=args.kd_lr, seed=args.seed,
                        use_bf16=use_bf16, progress=args.progress)
        if args.live_teacher:
            fitted = fit(student, splits, mean, std, cfg, device,
                         loss_fn=live_teacher_loss(teacher, t, alpha, use_bf16), desc=self.name)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                cached, labels = predict(teacher, splits.train, mean, std, progress=args.progress)
            print(f"{self.name}: teacher logits cached for {len(cached)} training images "
                  f"(teacher train top-1 {100 * float((cached.argmax(1) == labels).float().mean()):.2f}%)")
            fitted = fit(student, splits, mean, std, cfg, device, loss_fn=cached_teacher_loss(cached.float(), t, alpha),
                         desc=self.name, wrap_train=WithIndex)
        recipe = {"teacher": parent.architecture, "student": args.student, "temperature": t, "alpha": alpha,
                  "epochs": args.kd_epochs, "lr": args.kd_lr, "batch_size": self.batch_size, "seed": args.seed,
                  "augment": True, "teacher_logits": "live" if args.live_teacher else "cached, un-augmented",
                  "autocast": "bf16" if use_bf16 else "off", "bn_momentum": self.bn_momentum,
                  "loss": "alpha*T^2*KL(teacher_T||student_T) + (1-alpha)*CE"}
        return Transformed(
            student, recipe, student, keep_checkpoint=True, architecture=args.student,
            training={"best_epoch": fitted.best_epoch, "val_top1": round(fitted.best_val, 6),
                      "seconds": round(fitted.seconds, 1), "autocast": "bf16" if use_bf16 else "off",
                      "torch": torch.__version__, "history": fitted.history})


DISTILLED = Distilled()

if __name__ == "__main__":
    run_cli([DISTILLED], __doc__)
