"""What layerwise distillation reads from a ViT forward: each block's attention output, FFN output and output.

:class:`Taps` registers forward hooks on the blocks (their input and output) and
on each block's attention, so one ordinary forward of the backbone leaves the
representations behind — for the student (masked by :mod:`ssroute.prune.masks`,
whose hooks run first) and for the teacher alike. The FFN output is the block's
residual update after attention: ``output - input - attention output``.

>>> import torch
>>> from ssroute.models.vit import ViT
>>> vit = ViT(image_size=8, channels=1, dim=16, depth=2, heads=4, patch_size=2)
>>> taps = Taps(vit)
>>> _ = vit(torch.randn(3, 1, 8, 8))
>>> [t.shape[-1] for t in taps.outputs], len(taps.attn), len(taps.ffn())
([16, 16], 2, 2)
"""

from __future__ import annotations

from torch import Tensor, nn


class Taps:
    """Forward hooks on ``backbone``'s blocks; read after a forward, cleared by the next.

    Args:
        backbone: a ViT.
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.inputs: list[Tensor] = []
        self.attn: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.handles = []
        for i, block in enumerate(backbone.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, args, i=i: self._record(self.inputs, i, args[0])))
            self.handles.append(block.attn.register_forward_hook(lambda m, args, out, i=i: self._record(self.attn, i, out)))
            self.handles.append(block.register_forward_hook(lambda m, args, out, i=i: self._record(self.outputs, i, out[0])))

    def _record(self, where: list[Tensor], index: int, value: Tensor) -> None:
        if index == 0 and where is self.inputs:  # a new forward
            self.inputs.clear(), self.attn.clear(), self.outputs.clear()
        where.append(value)

    def ffn(self) -> list[Tensor]:
        """Each block's FFN output (its residual update after attention)."""
        return [out - x - a for x, a, out in zip(self.inputs, self.attn, self.outputs, strict=True)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
