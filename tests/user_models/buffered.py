"""An MLP classifier with a non-persistent normalisation buffer and a persistent buffer forward never reads."""
import torch
from torch import nn


class NormalizedMLP(nn.Module):
    def __init__(self, in_features=20, hidden=128, num_classes=5):
        super().__init__()
        self.register_buffer("mean", torch.linspace(-1, 1, in_features), persistent=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # bookkeeping, unused by forward
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x - self.mean)
