"""What SimMIM and MAE share: the encoder's patch grid, MTO settings, and the loss dict built from
MIM loss and MTO terms."""
from __future__ import annotations

from typing import Dict, List, Optional, Set

import torch
from torch import nn

from ..mto.attention import MTOAttention
from ..mto.losses import mto_terms, weighted_mto_loss
from ..mto.plan import block_flags, mto_settings
from .vit import block_telemetry


def blocks_macs(blocks: nn.ModuleList, tokens: int) -> int:
    """Multiply-adds of ViT blocks over `tokens` tokens: each Linear's (q, k, v, the projection,
    the MLP) and attention's two matmuls (2 tokens^2 width)."""
    total = 0
    for block in blocks:
        linear = sum(m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear))
        total += tokens * linear + 2 * tokens ** 2 * block.norm1.normalized_shape[0]
    return total


class MIMModel(nn.Module):
    """Base of the MIM models. Subclasses define `num_mim_blocks` (blocks that see mask tokens)."""

    num_mim_blocks: int

    def __init__(self, encoder: nn.Module, mto, activation_checkpointing: bool = False,
                 compile_blocks: bool = False, checkpoint_every: int = 1):
        super().__init__()
        self.encoder = encoder  # a timm VisionTransformer (models/vit.py)
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.num_patches = encoder.patch_embed.num_patches
        self.mto = mto_settings(mto)
        # Which blocks recompute in the backward pass (models/vit.py: checkpointed): 0 none, 1 all.
        self.checkpoint_every = checkpoint_every if activation_checkpointing else 0
        self.compile_blocks = compile_blocks  # torch.compile each block (models/vit.py)

    def no_weight_decay(self) -> Set[str]:
        """Names of parameters beyond the 1-D ones (norms, biases) that AdamW leaves undecayed,
        as in the method's reference code (timm's convention; engine/builder.py:param_groups)."""
        return set()

    def use_stats_kernel(self) -> None:
        """Point every MTO attention module at the `mto.kernel` implementation of the statistics.
        Subclasses call it once their blocks exist."""
        for module in self.modules():
            if isinstance(module, MTOAttention):
                module.stats_kernel = self.mto.kernel

    @staticmethod
    def boolean_mask(mask: torch.Tensor) -> torch.Tensor:
        """The mask as bool (True = masked): 0/1 integers, as SimMIM's reference generator gives
        them, are taken as such; a floating mask is refused (MTO's attention masks by it)."""
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"mask must be bool (True = masked) or 0/1 integers, got {mask.dtype}")
        return mask if mask.dtype == torch.bool else mask != 0

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every patch's prediction [B, L, patch*patch*3] (patchify's order), as the loss reads it."""
        raise NotImplementedError

    def prediction_pixels(self, images: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """`predict`'s output as (normalised) pixels of the patches: the same where the loss
        compares pixels directly."""
        return pred

    def flops_per_image(self) -> float:
        """FLOPs of one image's forward and backward, MFU's "model FLOPs": a multiply-add is 2,
        the backward twice the forward, less the patch embedding's gradient with respect to the
        images, which nothing needs. Neither MTO's statistics nor activation checkpointing's
        recomputation count (tests/test_perf_tools.py checks it against torch's FLOP counter)."""
        patch_embed = self.num_patches * 3 * self.patch_size ** 2 * self.encoder.embed_dim
        return 2.0 * (3 * (patch_embed + self.macs_after_patch_embed()) - patch_embed)

    def macs_after_patch_embed(self) -> int:
        """Multiply-adds of one image's forward after its patch embedding."""
        raise NotImplementedError

    def block_flags(self, with_stats: bool):
        return block_flags(self.mto, self.num_mim_blocks, with_stats)

    def mim_outputs(self, loss_mim: torch.Tensor, summaries: List[Optional[Dict[str, torch.Tensor]]],
                    num_early: int, mto_scale: float) -> Dict[str, torch.Tensor]:
        """{loss, loss_mim, loss_mto, loss_spa, loss_e, loss_r, heterogeneity, entropy_*}."""
        out = {"loss_mim": loss_mim}
        zero = loss_mim.new_zeros(())
        computed = [s for s in summaries if s is not None]
        if self.mto.enabled and computed:
            early = [s for s in summaries[:num_early] if s is not None]
            late = [s for s in summaries[num_early:] if s is not None]
            terms = mto_terms(early + late, len(early), self.mto.delta)
            loss_mto = weighted_mto_loss(terms, self.mto.lambda_spa, self.mto.lambda_e, self.mto.lambda_r,
                                         mto_scale)
        else:
            terms = {"loss_spa": zero, "loss_e": zero, "loss_r": zero}
            loss_mto = zero
        out.update({k: v.detach() for k, v in terms.items()})
        out["loss_mto"] = loss_mto
        out["loss"] = loss_mim + loss_mto if self.mto.enabled else loss_mim
        out.update(block_telemetry(summaries, loss_mim.device))
        return out
