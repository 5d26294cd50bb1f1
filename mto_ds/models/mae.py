"""MAE (He et al. 2022): the encoder sees visible patches only; mask tokens enter the decoder,
whose blocks are where MTO acts; MSE on per-patch normalised pixels of masked patches."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .mim import MIMModel, blocks_macs
from .simmim import patchify
from .vit import mim_block, run_blocks, run_plain_blocks, sincos_pos_embed


def visible_first(mask: torch.Tensor) -> torch.Tensor:
    """Patch indices [B, L]: visible patches first, then masked ones, each in patch order."""
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)


class MAE(MIMModel):
    def __init__(self, encoder: nn.Module, mto=None, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, norm_pix_loss: bool = True, activation_checkpointing: bool = False,
                 compile_blocks: bool = False, checkpoint_every: int = 1):
        super().__init__(encoder, mto, activation_checkpointing, compile_blocks, checkpoint_every)
        dim = encoder.embed_dim
        grid = encoder.patch_embed.grid_size[0]
        self.norm_pix_loss = norm_pix_loss
        # Patches each mask keeps visible, when known before the masks come (mask_fn_for sets it
        # from the generator): the encoder's sequence length then needs no read of a device mask,
        # which would make the host wait for the GPU's queue to drain at every forward.
        self.num_visible: Optional[int] = None
        # MAE keeps both position embeddings fixed (sin-cos).
        encoder.pos_embed.data.copy_(sincos_pos_embed(dim, grid))
        encoder.pos_embed.requires_grad_(False)
        self.decoder_embed = nn.Linear(dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_embed_dim, grid), persistent=False)
        self.decoder_blocks = nn.ModuleList([mim_block(decoder_embed_dim, decoder_num_heads)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * 3)
        self.num_mim_blocks = decoder_depth
        self._init_like_mae()
        self.use_stats_kernel()

    def _init_like_mae(self) -> None:
        """MAE's initialize_weights, encoder included: xavier-uniform Linear weights (the patch
        embedding's conv as a Linear) with zero biases, LayerNorms at 1 and 0, CLS and mask token
        normal with std 0.02. timm's defaults for its ViT differ (trunc-normal Linears, CLS ~1e-6)."""
        proj = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def macs_after_patch_embed(self) -> int:
        """CLS and the visible patches through the encoder (`num_visible`, which mask_fn_for sets),
        CLS and all patches through the decoder, each to its pixels."""
        if self.num_visible is None:
            raise ValueError("MAE's FLOPs depend on the visible patches: set num_visible (mask_fn_for does)")
        embed, visible, tokens = self.decoder_embed, self.num_visible + 1, self.num_patches + 1
        encoder = blocks_macs(self.encoder.blocks, visible) + visible * embed.in_features * embed.out_features
        decoder = blocks_macs(self.decoder_blocks, tokens) + tokens * self.decoder_pred.in_features * \
            self.decoder_pred.out_features
        return encoder + decoder

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder tokens of the visible patches [B, 1 + num_visible, D], CLS first.

        Every sample must mask the same number of patches (the MAE mask generator does); a batch
        whose samples do not fails (visible_count).
        """
        mask = self.boolean_mask(mask)
        enc = self.encoder
        # The input in the weights' dtype (bf16 under DeepSpeed); `images` stays float32 for the target.
        x = enc.patch_embed(images.to(enc.patch_embed.proj.weight.dtype)) + enc.pos_embed[:, 1:]
        B, L, D = x.shape
        keep = visible_first(mask)[:, : self.visible_count(mask)]
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, D))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1)
        x = enc.norm_pre(torch.cat([cls, x], dim=1))
        x = run_plain_blocks(enc.blocks, x, self.checkpoint_every, self.compile_blocks)
        return enc.norm(x)

    def visible_count(self, mask: torch.Tensor) -> int:
        """Patches each sample of `mask` keeps visible: `num_visible`, or read from the mask (a host
        sync). The encoder keeps that many per sample, so a mask with other counts would be cut
        silently: it fails instead, checked on the mask's device without waiting for it (on a GPU
        a device-side assert that surfaces at the next synchronisation)."""
        visible = mask.shape[1] - mask.sum(1)
        count = int(visible[0]) if self.num_visible is None else self.num_visible
        source = "num_visible" if self.num_visible is not None else "the first sample"
        torch._assert_async((visible == count).all(),
                            f"MAE needs the same number of visible patches in every sample's mask ({count} of "
                            f"{mask.shape[1]}, from {source}); this batch's masks differ")
        return count

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor, with_stats: bool):
        x = self.decoder_embed(latent)
        B, L = mask.shape
        # Visible tokens, then mask tokens, gathered back to patch order by the inverse of the
        # encoder's order (MAE's ids_restore): no boolean indexing, so no host sync.
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L - (x.shape[1] - 1), -1)
        restore = torch.argsort(visible_first(mask), dim=1)
        full = torch.gather(torch.cat([x[:, 1:], mask_tokens], dim=1), 1,
                            restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], full], dim=1) + self.decoder_pos_embed.to(x.dtype)
        masked = torch.cat([mask.new_zeros(B, 1), mask], dim=1)
        num_early, flags = self.block_flags(with_stats)
        x, summaries = run_blocks(self.decoder_blocks, x, masked, flags, self.checkpoint_every,
                                  self.compile_blocks)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return pred, summaries, num_early

    @staticmethod
    def _patch_mean_std(patches: torch.Tensor):
        """Each patch's mean and standard deviation (+1e-6 in the variance), norm_pix_loss's scale."""
        return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6) ** 0.5

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(images, self.patch_size).float()
        if self.norm_pix_loss:
            mean, std = self._patch_mean_std(target)
            target = (target - mean) / std
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        m = mask.float()
        return (per_patch * m).sum() / m.sum().clamp(min=1.0)

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every patch's prediction [B, L, patch*patch*3], in `patchify`'s order and the loss's
        target space: with norm_pix_loss, pixels normalised by their patch's mean and std."""
        mask = self.boolean_mask(mask)
        return self.forward_decoder(self.forward_encoder(images, mask), mask, with_stats=False)[0]

    def prediction_pixels(self, images: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """With norm_pix_loss, `pred` back in pixels: each patch's own mean and std, read from
        `images`, put back (the model predicts a patch's pattern, not its mean colour or contrast)."""
        if not self.norm_pix_loss:
            return pred
        mean, std = self._patch_mean_std(patchify(images, self.patch_size).float())
        return pred.float() * std + mean

    def forward(self, images: torch.Tensor, mask: torch.Tensor, mto_scale: float = 1.0,
                with_stats: bool = True) -> Dict[str, torch.Tensor]:
        mask = self.boolean_mask(mask)
        latent = self.forward_encoder(images, mask)
        pred, summaries, num_early = self.forward_decoder(latent, mask, with_stats)
        return self.mim_outputs(self.forward_loss(images, pred, mask), summaries, num_early, mto_scale)
