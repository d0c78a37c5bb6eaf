"""``trainer.compile=true``: ``torch.compile`` (PyTorch 2, TorchDynamo + Inductor) on the backbone's dense parts.

The MoE layer's shapes depend on the data — how many tokens each expert gets
is read to the host to cut the sorted tokens into per-expert blocks — so a
whole-backbone graph would break at every routed block and recompile for every
new load. Instead, in place and per block: a dense transformer block is
compiled whole (attention, LayerNorms and FFN in one graph), and a routed
block has its attention and LayerNorms compiled while its MoE layer (router and
experts) runs eagerly. ``nn.Module.compile`` keeps parameter names, so
checkpoints, exports and momentum-teacher copies are unchanged; batch sizes
that differ (training, evaluation, a last short batch) are marked dynamic by
Dynamo after the first recompile. The speed effect is measured in the MoE
benchmark, not asserted in tests.

>>> import torch
>>> from ssroute.models.vit import ViT
>>> compile_backbone(ViT(image_size=8, channels=1, dim=16, depth=2, heads=2, patch_size=2))
['blocks.0', 'blocks.1']
"""

from __future__ import annotations

from torch import nn

from ssroute.layers.block import TransformerBlock


def compile_backbone(backbone: nn.Module, **options) -> list[str]:
    """Compile the dense parts of every transformer block of ``backbone`` in place; returns the names compiled.

    Args:
        backbone: any ssroute backbone (its transformer blocks are found by type, so routing over depth works too).
        options: keyword arguments of ``torch.compile`` (e.g. ``mode="max-autotune"``).
    """
    compiled = []
    for name, block in backbone.named_modules():
        if not isinstance(block, TransformerBlock):
            continue
        if block.routed:
            for part in ("norm1", "attn", "norm2"):
                getattr(block, part).compile(**options)
                compiled.append(f"{name}.{part}")
        else:
            block.compile(**options)
            compiled.append(name)
    return compiled
