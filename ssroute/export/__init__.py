"""Sharing a pretrained model: ``python -m ssroute.export checkpoint=RUN out=DIR [format=hub|timm] [push_to_hub=REPO]``.

- :mod:`ssroute.export_folder` (below ``ssroute.pretrained``, which reads it): the Hugging Face Hub model layout (``config.json``,
  ``model.safetensors``, ``README.md``) that ``ssroute.load`` reads without Lightning or Hydra;
- :mod:`ssroute.export.card`: the model card (metrics, routing, data and budget, plots);
- :mod:`ssroute.export.timm_vit`: dense ViTs as timm ``VisionTransformer`` weights;
- :mod:`ssroute.export.__main__`: the command.

Importing this package imports nothing heavy; the command and the timm writer import their libraries themselves.
"""
