"""A keyword spotter on the stock nn.TransformerEncoder: log-mel frames -> linear front-end -> encoder -> mean."""
from torch import nn


class KeywordTransformer(nn.Module):
    def __init__(self, n_mels=40, d_model=64, nhead=4, num_layers=2, dim_feedforward=256, num_classes=12,
                 batch_first=True, norm_first=False, dropout=0.1):
        super().__init__()
        self.batch_first = batch_first
        self.frontend = nn.Sequential(nn.Linear(n_mels, d_model), nn.GELU())
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation="gelu",
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model) if norm_first else None,
                                             enable_nested_tensor=False)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, feats):  # feats: (batch, frames, n_mels)
        x = self.frontend(feats)
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.encoder(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.classifier(x.mean(dim=1))
