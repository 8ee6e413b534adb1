"""CvT as a dense-prediction backbone: per-stage feature maps under a small FPN-style head.

``cvt.create_model(name, features_only=True)`` returns the stages' maps (strides 4/8/16 for the
ImageNet variants, 2/4/8 for ``cvt_tiny``) with their channels in ``feature_info``. A feature
pyramid merges them top-down and predicts one class per pixel. The toy task: find the bright
square in a noisy image (2 classes: background, square), 30 steps of training by default.

    python examples/segmentation_backbone.py                 # cvt_tiny, 32x32, CPU seconds
    python examples/segmentation_backbone.py --model cvt_13 --img-size 224 --steps 5
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import cvt


class FPNHead(nn.Module):
    """Lateral 1x1 convs to a common width, top-down upsample-and-add, 3x3 smoothing, 1x1 classifier."""

    def __init__(self, in_channels: list[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # features: finest first, e.g. (B, 64, H/4, W/4), (B, 192, H/8, W/8), (B, 384, H/16, W/16)
        x = self.lateral[-1](features[-1])
        for lateral, feature in zip(self.lateral[-2::-1], features[-2::-1], strict=True):
            x = lateral(feature) + F.interpolate(x, size=feature.shape[-2:], mode="nearest")
        return self.classifier(self.smooth(x))  # (B, num_classes, H_finest, W_finest)


class Segmenter(nn.Module):
    """CvT stages → FPN head → logits upsampled to the input size."""

    def __init__(self, model_name: str, num_classes: int, img_size: int) -> None:
        super().__init__()
        self.backbone = cvt.create_model(model_name, features_only=True, img_size=img_size)
        self.head = FPNHead(self.backbone.feature_info.channels(), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def toy_batch(batch: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images with one bright square each, and its mask (1 inside the square, 0 elsewhere)."""
    images = 0.3 * torch.randn(batch, 3, size, size, generator=generator)
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    side = size // 3
    corners = torch.randint(0, size - side, (batch, 2), generator=generator).tolist()
    for i, (top, left) in enumerate(corners):
        images[i, :, top : top + side, left : left + side] += 1.0
        masks[i, top : top + side, left : left + side] = 1
    return images, masks


def train(model_name: str = "cvt_tiny", img_size: int = 32, steps: int = 30, batch: int = 8) -> list[float]:
    """Train the segmenter on fresh toy batches; returns the loss of every step."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = Segmenter(model_name, num_classes=2, img_size=img_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        images, masks = toy_batch(batch, img_size, generator)
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt_tiny")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    losses = train(args.model, args.img_size, args.steps)
    print(f"loss: first step {losses[0]:.3f}, last step {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
