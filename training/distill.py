"""Knowledge distillation: the fp32 parent (resnet18) teaches a small student (mobilenet_v3_small) from scratch.

    python -m training.distill artifacts/resnet18                          # -> variants/distilled
    python -m training.distill artifacts/resnet18 --temperature 4 --alpha 0.7 --epochs 12

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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from handlers.loading import build_model
from training import variant
from training.evaluate import predict, splits_for
from training.export import check_parity, to_torchscript
from training.speed import count_params
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


def make(parent_dir: Path, parent_meta: dict[str, Any], parent: torch.nn.Module,
         student_arch: str = "mobilenet_v3_small", temperature: float = 4.0, alpha: float = 0.7, epochs: int = 12,
         lr: float = 3e-3, batch_size: int = 32, seed: int = 0, name: str = "distilled",
         progress: bool = True, live_teacher: bool = False,
         bn_momentum: float = 0.1) -> tuple[dict[str, Any], torch.nn.Module]:
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need temperature > 0 and 0 <= alpha <= 1, got T={temperature}, alpha={alpha}")
    device = torch.device("cpu")
    seed_everything(seed)
    student = build_model(student_arch, parent_meta["num_classes"]).to(memory_format=torch.channels_last)
    set_bn_momentum(student, bn_momentum)
    splits = splits_for(parent_meta)
    use_bf16 = bf16_autocast_helps(device)
    print(f"{name}: teacher {parent_meta['architecture']} ({count_params(parent) / 1e6:.2f}M params) -> student "
          f"{student_arch} ({count_params(student) / 1e6:.2f}M params, from scratch), T={temperature}, "
          f"alpha={alpha}, {epochs} epochs")
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, use_bf16=use_bf16, progress=progress)
    if live_teacher:
        fitted = fit(student, splits, parent_meta["mean"], parent_meta["std"], cfg, device,
                     loss_fn=live_teacher_loss(parent, temperature, alpha, use_bf16), desc=name)
    else:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            cached, labels = predict(parent, splits.train, parent_meta["mean"], parent_meta["std"], progress=progress)
        print(f"{name}: teacher logits cached for {len(cached)} training images "
              f"(teacher train top-1 {100 * float((cached.argmax(1) == labels).float().mean()):.2f}%)")
        fitted = fit(student, splits, parent_meta["mean"], parent_meta["std"], cfg, device,
                     loss_fn=cached_teacher_loss(cached.float(), temperature, alpha), desc=name, wrap_train=WithIndex)

    scripted = to_torchscript(student, parent_meta["input_size"])
    parity = check_parity(student, scripted, splits.test, parent_meta)
    recipe = {"technique": "knowledge_distillation",
              "args": {"teacher": parent_meta["architecture"], "student": student_arch, "temperature": temperature,
                       "alpha": alpha, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                       "augment": True, "teacher_logits": "live" if live_teacher else "cached, un-augmented",
                       "autocast": "bf16" if use_bf16 else "off",
                       "loss": "alpha*T^2*KL(teacher_T||student_T) + (1-alpha)*CE"}}
    meta = variant.write_variant(
        parent_dir, name, scripted, recipe, architecture=student_arch,
        export={"method": "torch.jit.script+freeze", "parity": parity},
        state_dict=student.state_dict(),
        extra={"training": {"best_epoch": fitted.best_epoch, "val_top1": round(fitted.best_val, 6),
                            "seconds": round(fitted.seconds, 1), "autocast": "bf16" if use_bf16 else "off",
                            "torch": torch.__version__, "history": fitted.history}},
    )
    return meta, student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent_dir", type=Path, help="trained fp32 teacher directory")
    ap.add_argument("--student", default="mobilenet_v3_small", help="torchvision architecture of the student")
    ap.add_argument("--temperature", "-T", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.7, help="weight of the soft-target term (0..1)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="distilled")
    ap.add_argument("--live-teacher", action="store_true", help="run the teacher on every augmented batch")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args()
    variant.run_cli(args.parent_dir, lambda d, m, e: make(
        d, m, e, args.student, args.temperature, args.alpha, args.epochs, args.lr, args.batch_size, args.seed,
        args.name, args.progress, args.live_teacher))


if __name__ == "__main__":
    main()
