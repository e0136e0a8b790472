"""The geometry-agnostic transformer-GNN backbone (:class:`Backbone`) and its parts.

- :mod:`pcfm.nn.encoding`: Fourier position features (1 mm to 10 m), point-feature scaling,
  event conditioning (energy, angles, geometry tag);
- :mod:`pcfm.nn.tokenizer`: FPS + kNN groups + mini-PointNet tokens (:class:`Tokens`);
- :mod:`pcfm.nn.blocks`: local graph attention + global event attention + MLP, with AdaLN;
- :mod:`pcfm.nn.backbone`: :class:`Backbone`, :class:`BackboneConfig`, :data:`BACKBONE_PRESETS`.
"""
from pcfm.nn.backbone import (BACKBONE_PRESETS, Backbone, BackboneConfig, BackboneOutput, count_parameters,
                              preset_parameter_counts)
from pcfm.nn.blocks import AdaptiveLayerNorm, GlobalAttention, LocalAttention, TransformerGNNBlock
from pcfm.nn.encoding import (CONDITION_FIELDS, ConditionEncoder, FourierFeatures, FourierMLP, condition_features,
                              hide_condition)
from pcfm.nn.tokenizer import PointNetTokenizer, Tokens

__all__ = [
    "Backbone", "BackboneConfig", "BackboneOutput", "BACKBONE_PRESETS", "count_parameters",
    "preset_parameter_counts", "AdaptiveLayerNorm", "GlobalAttention", "LocalAttention", "TransformerGNNBlock",
    "CONDITION_FIELDS", "ConditionEncoder", "FourierFeatures", "FourierMLP", "condition_features", "hide_condition",
    "PointNetTokenizer", "Tokens",
]
