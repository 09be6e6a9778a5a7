"""The DETR-family multi-layer perceptron (box heads, query-position heads, mask embeddings)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (parameters ``layers.<i>.weight/bias``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x

    def upgrade_state_dict(self, state_dict: dict, prefix: str) -> None:
        """Rename, in place, the keys of checkpoints saved before this class was shared: Mask2Former's
        mask embedding was an ``nn.Sequential`` with the ReLUs in between (``<2i>.weight``)."""
        for index in range(len(self.layers)):
            for name in ("weight", "bias"):
                legacy = f"{prefix}{2 * index}.{name}"
                if legacy in state_dict:
                    state_dict[f"{prefix}layers.{index}.{name}"] = state_dict.pop(legacy)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.upgrade_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
