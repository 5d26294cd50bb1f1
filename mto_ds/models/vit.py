"""timm ViT encoders with MTO-capable attention, and the loop over blocks that see mask tokens."""
from __future__ import annotations

from functools import lru_cache, partial
from typing import Dict, List, Optional

import numpy as np
import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..mto.attention import MTOAttention
from ..mto.plan import LOSS, NONE, STATS_WITH_GRADIENTS, TELEMETRY
from ..mto.stats import block_summary, summary_weights

# Our arch names -> timm model names an exported encoder loads into.
TIMM_NAMES = {
    "vit_tiny_patch16": "vit_tiny_patch16_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
}


class MTOBlock(Block):
    """timm's Block (same parameters and names). Called as timm calls it, it is timm's forward;
    called with `mode`, the attention takes MTO's path and the block returns (x, its summary or
    None); `summary_weights` are `stats.summary_weights(masked)`, shared by a forward's blocks.

    All of a block's work happens inside its own call, so ZeRO-3 can gather the block's weights
    at once as one leaf module (engine/builder.py), instead of hooking each of its layers, and
    torch.compile (train.compile) fuses the summary into the block's graph.
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, *,
                masked: Optional[torch.Tensor] = None, recalibrate: bool = False, mode: Optional[str] = None,
                summary_weights: Optional[torch.Tensor] = None):
        if mode is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        h = self.norm1(x)
        if mode == TELEMETRY:
            # Output through SDPA as in the baseline; statistics beside it, without gradients.
            y, _ = self.attn.forward_mto(h, masked, recalibrate, with_stats=False)
            with torch.no_grad():
                stats = self.attn.row_stats(h, masked, recalibrate)
        else:
            y, stats = self.attn.forward_mto(h, masked, recalibrate, with_stats=mode in STATS_WITH_GRADIENTS,
                                             entropy=mode == LOSS)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, None if stats is None else block_summary(stats, masked, summary_weights)


def create_encoder(arch: str, img_size: int = 224, drop_path: float = 0.0, **overrides) -> nn.Module:
    """A timm VisionTransformer (no head) of MTOBlocks with MTOAttention (timm's parameter names).
    `overrides`: timm keyword arguments that replace the arch's (e.g. embed_dim and num_heads)."""
    if arch not in TIMM_NAMES:
        raise ValueError(f"unknown arch '{arch}'; expected one of {sorted(TIMM_NAMES)}")
    return timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0, img_size=img_size,
                             drop_path_rate=drop_path, attn_layer=MTOAttention, block_fn=MTOBlock, **overrides)


def mim_block(dim: int, num_heads: int) -> MTOBlock:
    """A decoder block like MAE's (timm Block, LayerNorm eps 1e-6) with MTO-capable attention."""
    return MTOBlock(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, attn_layer=MTOAttention,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6))


def _block_forward(block: MTOBlock, x: torch.Tensor, masked: torch.Tensor, recalibrate: bool, mode: str,
                   summary_weights: Optional[torch.Tensor]):
    """One block on MTO's path: (x, its summary or None)."""
    return block(x, masked=masked, recalibrate=recalibrate, mode=mode, summary_weights=summary_weights)


def _plain_block_forward(block: Block, x: torch.Tensor) -> torch.Tensor:
    return block(x)


@lru_cache(maxsize=None)
def _compiled(block_forward):
    """torch.compile of one block's forward, shared by every block ("regional" compilation, as in
    torchtitan): parameters are graph inputs, so blocks of one shape reuse one graph, and each
    (recalibrate, mode) pair adds one. Compiling block by block keeps compile time to that of one
    block and leaves the loop, checkpointing and DeepSpeed's module hooks in eager Python."""
    return torch.compile(block_forward)


def _run(block_forward, args, checkpointed: bool, compiled: bool):
    fn = _compiled(block_forward) if compiled else block_forward
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def checkpointed(index: int, checkpoint_every: int) -> bool:
    """Whether block `index` of a stack is recomputed in the backward pass: every `checkpoint_every`-th
    block from the first (torchtitan's selective layer checkpointing), none for 0. The others keep
    their activations: memory traded for the recomputation's time."""
    return checkpoint_every > 0 and index % checkpoint_every == 0


def run_blocks(blocks, x: torch.Tensor, masked: Optional[torch.Tensor], flags, checkpoint_every: int,
               compiled: bool = False):
    """Run blocks that see mask tokens. Returns (x, per-block summaries, None where not computed)."""
    summaries: List[Optional[Dict[str, torch.Tensor]]] = []
    # The summaries' weights depend on the mask alone: once per forward pass, not per block.
    weights = summary_weights(masked) if any(mode != NONE for _, mode in flags) else None
    for index, (block, (recalibrate, mode)) in enumerate(zip(blocks, flags)):
        x, summary = _run(_block_forward, (block, x, masked, recalibrate, mode, weights),
                          checkpointed(index, checkpoint_every), compiled)
        summaries.append(summary)
    return x, summaries


def run_plain_blocks(blocks, x: torch.Tensor, checkpoint_every: int, compiled: bool = False) -> torch.Tensor:
    """Blocks that see no mask tokens (the MAE encoder): timm's forward, fused SDPA."""
    for index, block in enumerate(blocks):
        x = _run(_plain_block_forward, (block, x), checkpointed(index, checkpoint_every), compiled)
    return x


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [1, (1 +) grid*grid, dim] as MAE uses."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    parts = []
    # MAE's order: its first half ("emb_h") is computed from meshgrid(grid_w, grid_h)[0], which is
    # the column (x) coordinate; the second half from the row (y). Patches run row-major.
    for coord in (xs.reshape(-1), ys.reshape(-1)):
        angles = np.outer(coord, omega)
        parts += [np.sin(angles), np.cos(angles)]
    emb = np.concatenate(parts, axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def block_telemetry(summaries, device) -> Dict[str, torch.Tensor]:
    """Per-block vectors (detached, on device): heterogeneity, entropy_masked, entropy_visible.

    NaN marks a block whose statistics were not computed in this forward pass.
    """
    nan = torch.full((), float("nan"), device=device)
    return {key: torch.stack([s[key].detach().float() if s is not None else nan for s in summaries])
            for key in ("heterogeneity", "entropy_masked", "entropy_visible")}


__all__ = ["MTOBlock", "create_encoder", "mim_block", "run_blocks", "run_plain_blocks", "sincos_pos_embed",
           "TIMM_NAMES", "block_telemetry"]
