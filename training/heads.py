"""Projection and prediction heads, each a stack of (Linear, optional BatchNorm, optional ReLU) blocks.

Widths follow the papers; `hidden` and `out` scale them down for small models.
"""

from __future__ import annotations

from torch import nn

Block = tuple[int, int, bool, bool]  # (in, out, batch norm, ReLU)


class ProjectionHead(nn.Sequential):
    def __init__(self, blocks: list[Block], last_bn_affine: bool = True):
        layers: list[nn.Module] = []
        for i, (d_in, d_out, bn, relu) in enumerate(blocks):
            layers.append(nn.Linear(d_in, d_out, bias=not bn))
            if bn:
                last = i == len(blocks) - 1
                layers.append(nn.BatchNorm1d(d_out, affine=last_bn_affine or not last))
            if relu:
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def simclr_projector(dim: int, hidden: int = 2048, out: int = 128) -> ProjectionHead:
    """SimCLR v1: Linear-BN-ReLU-Linear (Chen et al., 2020)."""
    return ProjectionHead([(dim, hidden, True, True), (hidden, out, False, False)])


def moco_v2_projector(dim: int, hidden: int = 2048, out: int = 128) -> ProjectionHead:
    """MoCo v2: Linear-ReLU-Linear, no BN (Chen et al., 2020b)."""
    return ProjectionHead([(dim, hidden, False, True), (hidden, out, False, False)])


def moco_v3_projector(dim: int, hidden: int = 4096, out: int = 256) -> ProjectionHead:
    """MoCo v3: 3 layers, BN everywhere, last BN without affine (Chen et al., 2021)."""
    return ProjectionHead([(dim, hidden, True, True), (hidden, hidden, True, True), (hidden, out, True, False)],
                          last_bn_affine=False)


def moco_v3_predictor(dim: int = 256, hidden: int = 4096, out: int = 256) -> ProjectionHead:
    """MoCo v3 predictor: Linear-BN-ReLU-Linear, no BN at the output."""
    return ProjectionHead([(dim, hidden, True, True), (hidden, out, False, False)])


def byol_projector(dim: int, hidden: int = 4096, out: int = 256) -> ProjectionHead:
    """BYOL projector and predictor share this shape: Linear-BN-ReLU-Linear (Grill et al., 2020)."""
    return ProjectionHead([(dim, hidden, True, True), (hidden, out, False, False)])


def simsiam_projector(dim: int, hidden: int = 2048, out: int = 2048) -> ProjectionHead:
    """SimSiam: 3 layers with BN, output BN without ReLU and without affine (Chen & He, 2021)."""
    return ProjectionHead([(dim, hidden, True, True), (hidden, hidden, True, True), (hidden, out, True, False)],
                          last_bn_affine=False)


def simsiam_predictor(dim: int = 2048, hidden: int = 512) -> ProjectionHead:
    """SimSiam predictor: bottleneck Linear-BN-ReLU-Linear."""
    return ProjectionHead([(dim, hidden, True, True), (hidden, dim, False, False)])


def swav_projector(dim: int, hidden: int = 2048, out: int = 128) -> ProjectionHead:
    """SwAV: Linear-BN-ReLU-Linear (Caron et al., 2020)."""
    return ProjectionHead([(dim, hidden, True, True), (hidden, out, False, False)])
