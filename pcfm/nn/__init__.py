"""The geometry-agnostic transformer-GNN backbone (:class:`Backbone`) and its parts.

- :mod:`pcfm.nn.frame`: positions in each event's detector frame, in material units (X0, R_M);
- :mod:`pcfm.nn.serialization`: space-filling-curve order and nested groups covering every point;
- :mod:`pcfm.nn.encoding`: Fourier position features, event conditioning (energy, angles, geometry tag);
- :mod:`pcfm.nn.tokenizer`: the U-Net's down path to tokens (:class:`Tokens`) and up path to points;
- :mod:`pcfm.nn.blocks`: local graph attention + global event attention + MLP, with AdaLN;
- :mod:`pcfm.nn.backbone`: :class:`Backbone`, :class:`BackboneConfig`, :data:`BACKBONE_PRESETS`.
"""
from pcfm.nn.backbone import (BACKBONE_PRESETS, Backbone, BackboneConfig, BackboneOutput, count_parameters,
                              preset_parameter_counts, token_coverage)
from pcfm.nn.blocks import AdaptiveLayerNorm, GlobalAttention, LocalAttention, TransformerGNNBlock
from pcfm.nn.encoding import (CONDITION_FIELDS, ConditionEncoder, FourierFeatures, FourierMLP, condition_features,
                              hide_condition)
from pcfm.nn.frame import detector_coordinates, event_geometry_names
from pcfm.nn.tokenizer import HierarchicalTokenizer, PointDecoder, Tokens

__all__ = [
    "Backbone", "BackboneConfig", "BackboneOutput", "BACKBONE_PRESETS", "count_parameters",
    "preset_parameter_counts", "AdaptiveLayerNorm", "GlobalAttention", "LocalAttention", "TransformerGNNBlock",
    "CONDITION_FIELDS", "ConditionEncoder", "FourierFeatures", "FourierMLP", "condition_features", "hide_condition",
    "HierarchicalTokenizer", "PointDecoder", "Tokens", "detector_coordinates", "event_geometry_names",
    "token_coverage",
]
