"""The model shapes ``polyak bench`` measures (built here: no torchvision needed).

* ``transformer``: a GPT-like stack, 20.2M parameters in 399 tensors (33 blocks of two
  LayerNorms, fused qkv, projection and a 4x MLP; token and position embeddings; a final
  LayerNorm without bias). Many small tensors: per-tensor overhead shows.
* ``mlp``: four 5000x5000 linear layers, 100M parameters in 8 tensors. Few huge tensors:
  temporaries and memory bandwidth show.
* ``resnet50``: the ResNet-50 layout (bottlenecks 3-4-6-3, 25.6M parameters in 161 tensors plus
  159 BatchNorm buffers, of which 53 integer ``num_batches_tracked``).
* ``transformer-bf16``: the transformer in bfloat16 (averages stay float32 in polyak).

``scale < 1`` shrinks widths (same tensor counts) for the quick mode and the tests.
"""

from __future__ import annotations

import torch
from torch import nn

from polyak.cli.bench.config import SHAPES

__all__ = ["SHAPES", "build_model", "describe", "one_element_tensors"]


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)


class Transformer(nn.Module):
    """Only the parameter layout of a GPT-like model matters here (no forward)."""

    def __init__(self, d: int = 208, vocab: int = 13500, context: int = 1024, depth: int = 33):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.ModuleList([_Block(d) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(d, bias=False)


class MLP(nn.Sequential):
    def __init__(self, width: int = 5000, depth: int = 4) -> None:
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(width, width))
            if i < depth - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        cout = 4 * mid
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class ResNet50(nn.Module):
    def __init__(self, width: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, blocks in enumerate((3, 4, 6, 3)):
            mid = width * 2**i
            layer = []
            for b in range(blocks):
                layer.append(_Bottleneck(cin, mid, 2 if (b == 0 and i > 0) else 1))
                cin = 4 * mid
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(shape: str, scale: float = 1.0, seed: int = 0) -> nn.Module:
    """A freshly initialised model of ``shape`` (one of :data:`SHAPES`), in train mode."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    torch.manual_seed(seed)
    if shape in ("transformer", "transformer-bf16"):
        d = max(8, int(208 * scale) // 8 * 8)
        model: nn.Module = Transformer(d, max(16, int(13500 * scale)), max(8, int(1024 * scale)))
    elif shape == "mlp":
        model = MLP(max(16, int(5000 * scale)))
    else:
        model = ResNet50(max(4, int(64 * scale)), max(10, int(1000 * scale)))
        with torch.no_grad():  # BN statistics that differ from their defaults
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    assert m.running_mean is not None and m.running_var is not None
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    if shape == "transformer-bf16":
        model = model.to(torch.bfloat16)
    return model


class _Scalars(nn.Module):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.values = nn.ParameterList(nn.Parameter(torch.zeros(1)) for _ in range(count))


def one_element_tensors(count: int, seed: int = 0) -> nn.Module:
    """A model of ``count`` one-element float32 parameters: an update of it is all overhead."""
    torch.manual_seed(seed)
    model = _Scalars(count)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def describe(model: nn.Module) -> dict[str, int]:
    """Tensor and element counts of a model."""
    params = list(model.parameters())
    buffers = list(model.buffers())
    return {
        "param_tensors": len(params),
        "params": sum(p.numel() for p in params),
        "buffer_tensors": len(buffers),
        "float_buffer_elements": sum(b.numel() for b in buffers if b.is_floating_point()),
    }
