"""Self-supervised losses, one per file. CLIP's loss is open_clip's ClipLoss."""

from .info_nce import InfoNCELoss
from .mae import masked_patch_mse
from .negative_cosine import NegativeCosineSimilarity
from .nt_xent import NTXentLoss
from .swav import SwAVLoss, sinkhorn

__all__ = ["InfoNCELoss", "NTXentLoss", "NegativeCosineSimilarity", "SwAVLoss", "masked_patch_mse", "sinkhorn"]
