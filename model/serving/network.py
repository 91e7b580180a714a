"""The classifier network: torchvision's ResNet50 with a one-logit head (sigmoid → probability)."""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

IMAGENET_WEIGHTS = "IMAGENET1K_V2"


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for but are not in torchvision's local cache."""


def imagenet_weights_path(weights_name: str = IMAGENET_WEIGHTS) -> str:
    """Where torchvision's cache keeps the ImageNet ResNet50 weights of that name."""
    from torchvision.models import ResNet50_Weights

    weights = ResNet50_Weights[weights_name]
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def build_resnet50(
    init: Literal["random", "imagenet"] = "random", *, weights_name: str = IMAGENET_WEIGHTS
) -> torch.nn.Module:
    """ResNet50 (torchvision) whose fully connected layer gives one malignancy logit.

    ``init="imagenet"`` starts from torchvision's ImageNet weights, read from the local cache
    only (nothing is downloaded at run time); :class:`PretrainedWeightsUnavailable` says where
    to put the file when it is missing. The new head is initialised randomly either way.
    """
    from torchvision.models import ResNet50_Weights, resnet50

    if init not in ("random", "imagenet"):
        raise ValueError(f"init: expected 'random' or 'imagenet', got {init!r}")
    model = resnet50(weights=None)
    if init == "imagenet":
        weights = ResNet50_Weights[weights_name]
        path = imagenet_weights_path(weights_name)
        if not os.path.isfile(path):
            raise PretrainedWeightsUnavailable(
                f"ImageNet weights {weights_name} for ResNet50 are not in the local torchvision "
                f"cache ({path}); nothing is downloaded at run time. On a machine with network "
                f"access download {weights.url} to that path (or set TORCH_HOME to a folder "
                "holding hub/checkpoints/ with it), or train with random initialisation."
            )
        try:
            # The weights API finds the file in the cache and does not download it.
            state = weights.get_state_dict(progress=False)
        except OSError as exc:  # the file vanished and a download was attempted offline
            raise PretrainedWeightsUnavailable(
                f"ImageNet weights {weights_name} could not be read from {path}: {exc}"
            ) from exc
        model.load_state_dict(state)
        logger.info("ResNet50 initialised from ImageNet weights %s", weights_name)
    model.fc = torch.nn.Linear(model.fc.in_features, 1)
    return model


def features_and_logits(
    network: torch.nn.Module, batch: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass of a ResNet50 built here, as torchvision's ``ResNet.forward`` runs it:
    the global average of each residual stage's output (``layer1`` … ``layer4``, n × 256 …
    n × 2048; ``layer4``'s is the penultimate layer) and the logits (n,)."""
    net: Any = network  # torchvision's ResNet; its stages are attributes
    x = net.maxpool(net.relu(net.bn1(net.conv1(batch))))
    features: dict[str, torch.Tensor] = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(net, name)(x)
        features[name] = x.mean(dim=(2, 3))
    logits = net.fc(torch.flatten(net.avgpool(x), 1)).reshape(-1)
    return features, logits
