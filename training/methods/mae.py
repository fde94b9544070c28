"""MAE (He et al., 2022): masked autoencoding with a ViT.

A random `mask_ratio` (0.75) of the patches is hidden; the encoder (the
backbone ViT) sees only the visible patches plus the class token; a light
decoder (`decoder_depth` blocks of width `decoder_width`) gets the encoded
patches back in place with a shared learned mask token at the hidden
positions and predicts every patch's pixels. The loss is the MSE on the hidden
patches only, against per-patch normalised pixels. Exported and served is the
plain encoder on the whole image, pooled as the mean of its patch tokens (as
MAE fine-tunes): the loss never reads the class token, and on the shapes
benchmark the mean beat it by 5 points of linear-probe accuracy (1,000 steps).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from training.config import MAEConfig
from training.losses import masked_patch_mse

from .base import SSLMethod


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, (H/p)*(W/p), p*p*3], row-major patches, pixels (y, x, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_masking(n_patches: int, ratio: float, batch: int, device: torch.device,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep [B, keep], ids_restore [B, N], mask [B, N] with 1 = hidden), per-sample random."""
    keep = max(1, int(round(n_patches * (1 - ratio))))
    noise = torch.rand(batch, n_patches, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, n_patches, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)


class MAE(SSLMethod):
    name, recipe = "mae", "mae"
    sync_batchnorm = False
    needs_vit = True
    config: MAEConfig

    def __init__(self, config: MAEConfig, dist=None, probe_classes=None):  # type: ignore[no-untyped-def]
        super().__init__(config, dist, probe_classes)
        config = self.config  # the method's own config class
        vit = self.backbone.net
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"MAE needs a ViT backbone (vit-micro, vit-tiny, vit-small), not {config.backbone}")
        vit.global_pool = "avg"  # the image's embedding: mean of the patch tokens (docstring)
        self.patch = vit.patch_embed.patch_size[0]
        n, width, dw = vit.patch_embed.num_patches, vit.embed_dim, config.decoder_width
        self.decoder_embed = nn.Linear(width, dw)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dw))
        self.decoder_pos = nn.Parameter(torch.zeros(1, n + 1, dw))
        heads = max(1, dw // 32)
        self.decoder = nn.Sequential(*[Block(dw, heads, mlp_ratio=4.0) for _ in range(config.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dw)
        self.decoder_pred = nn.Linear(dw, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.decoder_pos, std=0.02)
        self.last_mask: torch.Tensor | None = None

    def projector_module(self) -> None:
        return None

    def encode_visible(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """[B, 1 + keep, width]: class token and the kept patches, through the encoder."""
        vit = self.backbone.net
        x = vit.patch_embed(images) + vit.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[2]))
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(len(x), -1, -1)
        return vit.norm(vit.blocks(vit.norm_pre(torch.cat([cls, x], dim=1))))

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*3] pixel predictions for every patch."""
        y = self.decoder_embed(latent)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, n + 1 - y.shape[1], -1)
        patches = torch.cat([y[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, y.shape[2]))
        y = torch.cat([y[:, :1], patches], dim=1) + self.decoder_pos
        return self.decoder_pred(self.decoder_norm(self.decoder(y)))[:, 1:]

    def ssl_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe reads the mean of the *visible* patch tokens: free, where the whole image would cost
        another encoder pass on four times the tokens."""
        images = views[0]
        n = self.backbone.net.patch_embed.num_patches
        ids_keep, ids_restore, mask = random_masking(n, self.config.mask_ratio, len(images), images.device)
        latent = self.encode_visible(images, ids_keep)
        prediction = self.decode(latent, ids_restore)
        self.last_mask = mask
        return masked_patch_mse(prediction, patchify(images, self.patch), mask), latent[:, 1:].mean(dim=1)
