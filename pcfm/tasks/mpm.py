"""Masked point modelling: hide a share of each event's tokens and reconstruct their points.

As in Point-MAE and PoLAr-MAE, adapted to detector data with energies:

1. the backbone groups each event's points once (:meth:`~pcfm.nn.Backbone.group`: tokens of
   about ``group_size`` points that cover every point and do not overlap);
2. a random share ``mask_ratio`` of each event's tokens is hidden (:func:`draw_mask`);
3. the backbone embeds and encodes the visible tokens only (``backbone.embed(tokens, data,
   visible)`` then ``backbone.encode(tokens, keep_mask)``): the hidden tokens' points reach no
   visible token, through the groups or through the neighbour graphs;
4. a light decoder (:class:`MaskDecoder`: transformer-GNN blocks of the backbone's kind over
   all tokens, a learned mask token standing in for each hidden one at its absolute position in
   the detector frame) predicts, for each hidden token, ``group_size`` points: their offsets
   from the token's position in units of the group's size, the group's size, and each point's
   energy in the backbone's log-energy units (``log(E / MeV)``, column 0 of ``data.x``);
5. the loss compares predicted and true points of each hidden token (:func:`mpm_terms`).

Every point of a hidden token is a target; a token has fewer than ``group_size`` points when
its event does not fill it, and is compared with the first as many predicted slots (padding).
Offsets are in frame units (X0 / R_M, :mod:`pcfm.nn.frame`) divided by the group's root mean
square radius ``s``, which the decoder predicts as ``log s``: the shape term then weighs a
LArTPC token of 0.2 X0 and a calorimeter token of 2 R_M alike.

Loss (weights are constructor arguments)::

    loss = chamfer_weight * chamfer + scale_weight * scale + point_energy_weight * point_energy
           + total_energy_weight * total_energy

- ``chamfer``: squared-distance Chamfer distance between the predicted and true normalised
  offsets of a group, averaged over hidden groups (:func:`chamfer_distance`). With
  ``energy_weighted_chamfer`` (the default) the true-to-predicted half weighs each true point by
  its share of the group's energy, so the high-energy core of a shower counts more than its halo.
- ``scale``: Huber loss between the predicted and true ``log s`` of each group.
- ``point_energy``: Huber loss between each true point's log-energy and that of its nearest
  predicted point (nearest by position), averaged per group, then over groups.
- ``total_energy``: Huber loss between the log of the group's predicted and true total energy.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcfm.data.augment import augment_by_symmetry
from pcfm.nn import Backbone, BackboneConfig, Tokens
from pcfm.nn.blocks import AdaptiveLayerNorm, TransformerGNNBlock, run_token_blocks
from pcfm.nn.encoding import CONDITION_FIELDS, FourierFeatures, FourierMLP, hide_condition
from pcfm.nn.serialization import offsets
from pcfm.tasks.objective import Objective


def draw_mask(ptr: Tensor, ratio: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Boolean mask (T,) of the hidden tokens of a ragged batch with token offsets ``ptr`` (B + 1,).

    Event ``b`` with ``n_b`` tokens hides ``round(ratio * n_b)`` of them, chosen uniformly at
    random, but keeps at least one visible and, when ``n_b >= 2``, hides at least one.
    Random numbers come from ``generator`` (default: torch's global generator).
    """
    counts = ptr[1:] - ptr[:-1]
    num_tokens = int(ptr[-1])
    batch = torch.repeat_interleave(torch.arange(len(counts), device=ptr.device), counts)
    hidden = torch.round(ratio * counts.double()).long()
    hidden = torch.minimum(hidden, (counts - 1).clamp(min=0))
    hidden = torch.maximum(hidden, (counts >= 2).long())
    score = torch.rand(num_tokens, generator=generator, device=generator.device if generator else ptr.device)
    order = torch.argsort(batch.double() + score.to(ptr.device, torch.float64))  # random order within events
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_tokens, device=ptr.device) - ptr[batch[order]]
    return rank < hidden[batch]


def chamfer_distance(prediction: Tensor, target: Tensor, valid: Tensor,
                     target_weight: Optional[Tensor] = None) -> Tensor:
    """Chamfer distance (G,) between point sets of equal, ragged size, one pair per group.

    ``prediction`` and ``target`` are (G, K, D), ``valid`` (G, K) marks the real points of both
    (the same slots; padding is ignored). The distance of a group is
    ``mean_i min_j |p_i - t_j|^2 + mean_j min_i |p_i - t_j|^2`` over its valid points; with
    ``target_weight`` (G, K), the second mean is weighted by it (weights are normalised per
    group). A group without valid points gives 0.
    """
    squared = (prediction[:, :, None, :] - target[:, None, :, :]).square().sum(-1)  # (G, K_pred, K_target)
    pair_valid = valid[:, :, None] & valid[:, None, :]
    squared = squared.masked_fill(~pair_valid, torch.inf)
    to_target = squared.amin(2).masked_fill(~valid, 0.0)  # nearest target of each prediction
    to_prediction = squared.amin(1).masked_fill(~valid, 0.0)  # nearest prediction of each target
    count = valid.sum(1).clamp(min=1).to(prediction.dtype)
    if target_weight is None:
        target_weight = valid.to(prediction.dtype)
    target_weight = target_weight * valid
    target_weight = target_weight / target_weight.sum(1, keepdim=True).clamp(min=torch.finfo(prediction.dtype).tiny)
    return to_target.sum(1) / count + (to_prediction * target_weight).sum(1)


class MaskDecoder(nn.Module):
    """Visible token features + mask tokens -> per hidden group, ``group_size`` points (offset, log E).

    The blocks are the backbone's :class:`~pcfm.nn.blocks.TransformerGNNBlock` (local kNN-graph
    attention with relative-position bias, global event attention with distance penalties,
    AdaLN conditioned on the event), so the decoder sees the same geometry as the encoder.
    """

    def __init__(self, config: BackboneConfig, depth: int):
        super().__init__()
        c = config
        wavelengths = dict(min_wavelength=c.min_wavelength, max_wavelength=c.max_wavelength)
        self.config = config
        self.mask_token = nn.Parameter(torch.zeros(c.width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.position_embedding = FourierMLP(c.width, c.num_frequencies, **c.absolute_wavelengths)
        self.edge_fourier = FourierFeatures(c.num_frequencies, **wavelengths)
        self.blocks = nn.ModuleList(
            TransformerGNNBlock(c.width, c.heads, c.cond_dim, self.edge_fourier.out_dim, mlp_ratio=c.mlp_ratio,
                                distance_scales=c.distance_scales, attention_backend=c.attention_backend)
            for _ in range(depth))
        self.norm = AdaptiveLayerNorm(c.width, c.cond_dim)
        self.head = nn.Linear(c.width, c.group_size * 4 + 1)  # per point: 3 offsets + log-energy; log size

    def forward(self, tokens: Tokens, visible_features: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Predicted normalised offsets (G, K, 3), log-energies (G, K) and log group sizes (G,) of
        the ``G = hidden.sum()`` hidden groups, in token order."""
        dtype = self.mask_token.dtype
        x = self.mask_token.expand(hidden.shape[0], -1).clone()
        x[~hidden] = visible_features.to(dtype)
        x = x + self.position_embedding(tokens.pos).to(dtype)
        x = run_token_blocks(self.blocks, x, tokens, local_k=self.config.local_k,
                             cluster_backend=self.config.cluster_backend, edge_fourier=self.edge_fourier)
        out = self.head(self.norm(x, tokens.condition, tokens.batch)[hidden]).float()
        points = out[:, :-1].unflatten(1, (self.config.group_size, 4))
        return points[..., :3], points[..., 3], out[:, -1]


#: Floor of a group's root mean square radius (frame units): a one-point group has radius 0.
MIN_GROUP_SCALE = 1e-3


def hidden_group_targets(tokens: Tokens, hidden: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """True points of the hidden groups, padded: offsets (G, K, 3) from the token's position in
    units of the group's root mean square radius, log-energies (G, K) (``x[:, 0]``), the valid
    mask (G, K), and the log radius (G,)."""
    token = tokens.group_token
    group_start = offsets(token, tokens.pos.shape[0])
    slot = torch.arange(token.shape[0], device=hidden.device) - group_start[token]
    member = hidden[token]
    token, slot = token[member], slot[member]
    group = torch.cumsum(hidden, 0)[token] - 1  # index among the hidden groups
    num_groups = int(hidden.sum())
    offset = torch.zeros(num_groups, group_size, 3, device=hidden.device)
    log_energy = torch.zeros(num_groups, group_size, device=hidden.device)
    valid = torch.zeros(num_groups, group_size, dtype=torch.bool, device=hidden.device)
    offset[group, slot] = (tokens.point_pos[member] - tokens.pos[token]).float()
    log_energy[group, slot] = tokens.point_features[member, 0].float()
    valid[group, slot] = True
    squared = offset.square().sum(-1).sum(1) / valid.sum(1).clamp(min=1)
    scale = squared.sqrt().clamp(min=MIN_GROUP_SCALE)
    return offset / scale[:, None, None], log_energy, valid, scale.log()


def mpm_terms(predicted_offset: Tensor, predicted_log_energy: Tensor, predicted_log_scale: Tensor, offset: Tensor,
              log_energy: Tensor, valid: Tensor, log_scale: Tensor, *, huber_delta: float = 1.0,
              energy_weighted_chamfer: bool = True) -> dict[str, Tensor]:
    """The four loss terms (scalars) of the module docstring, from padded predictions and targets."""
    target_weight = None
    if energy_weighted_chamfer:
        target_weight = torch.softmax(log_energy.masked_fill(~valid, -torch.inf), dim=1).nan_to_num(0.0)
    chamfer = chamfer_distance(predicted_offset, offset, valid, target_weight)

    # Each true point's energy against its nearest predicted point's (the match gets no gradient).
    squared = (offset[:, :, None, :] - predicted_offset[:, None, :, :].detach()).square().sum(-1)
    squared = squared.masked_fill(~(valid[:, :, None] & valid[:, None, :]), torch.inf)
    nearest = squared.argmin(2)  # (G, K): predicted slot nearest to each true point
    matched = predicted_log_energy.gather(1, nearest)
    point_error = F.huber_loss(matched, log_energy, delta=huber_delta, reduction="none") * valid
    point_energy = point_error.sum(1) / valid.sum(1).clamp(min=1)

    log_total = lambda values: torch.logsumexp(values.masked_fill(~valid, -torch.inf), dim=1)  # noqa: E731
    total_energy = F.huber_loss(log_total(predicted_log_energy), log_total(log_energy), delta=huber_delta,
                                reduction="none")
    scale = F.huber_loss(predicted_log_scale, log_scale, delta=huber_delta)
    return {"chamfer": chamfer.mean(), "scale": scale, "point_energy": point_energy.mean(),
            "total_energy": total_energy.mean()}


class MaskedPointModelling(Objective):
    """Masked point modelling (module docstring): hide tokens, encode the rest, rebuild the hidden.

    Args:
        backbone_config: the backbone's configuration (decoder sizes and group size follow it).
        mask_ratio: share of each event's tokens to hide (Point-MAE and PoLAr-MAE use 0.6).
        decoder_depth: transformer-GNN blocks of the decoder.
        chamfer_weight, scale_weight, point_energy_weight, total_energy_weight: weights of the
            loss terms.
        huber_delta: where the Huber losses on log-energies turn from quadratic to linear (an
            energy off by a factor e^delta).
        energy_weighted_chamfer: weigh the true points of the Chamfer distance by energy share.
        condition_dropout: while training, each event's incident energy, theta and phi are each
            hidden from the conditioning (read as unknown) with this probability, so that the
            backbone also serves tasks that must not see them (energy regression) or data that
            lacks them; 0 turns it off.
        augment: while training, show each event in a random symmetry of its detector
            (:func:`~pcfm.data.augment.augment_by_symmetry`).
    """

    name = "mpm"

    def __init__(self, backbone_config: BackboneConfig, *, mask_ratio: float = 0.6, decoder_depth: int = 2,
                 chamfer_weight: float = 1.0, scale_weight: float = 1.0, point_energy_weight: float = 1.0,
                 total_energy_weight: float = 1.0, huber_delta: float = 1.0, energy_weighted_chamfer: bool = True,
                 condition_dropout: float = 0.2, augment: bool = True):
        super().__init__()
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        if not 0.0 <= condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {condition_dropout}")
        self.condition_dropout = float(condition_dropout)
        self.augment = bool(augment)
        self.mask_ratio = float(mask_ratio)
        self.decoder_depth = int(decoder_depth)
        self.weights = {"chamfer": float(chamfer_weight), "scale": float(scale_weight),
                        "point_energy": float(point_energy_weight), "total_energy": float(total_energy_weight)}
        self.huber_delta = float(huber_delta)
        self.energy_weighted_chamfer = bool(energy_weighted_chamfer)
        self.group_size = backbone_config.group_size
        self.decoder = MaskDecoder(backbone_config, self.decoder_depth)

    def config(self) -> dict[str, Any]:
        return {"mask_ratio": self.mask_ratio, "decoder_depth": self.decoder_depth,
                **{f"{name}_weight": weight for name, weight in self.weights.items()},
                "huber_delta": self.huber_delta, "energy_weighted_chamfer": self.energy_weighted_chamfer,
                "condition_dropout": self.condition_dropout, "augment": self.augment}

    def drop_conditions(self, batch, generator: Optional[torch.Generator] = None):
        """``batch`` with each condition field hidden, event by event, with probability ``condition_dropout``."""
        num_events = int(getattr(batch, "num_graphs", 1) or 1)
        device = generator.device if generator is not None else batch.pos.device
        for name in CONDITION_FIELDS:
            if getattr(batch, name, None) is not None:
                drop = torch.rand(num_events, generator=generator, device=device) < self.condition_dropout
                batch = hide_condition(batch, (name,), drop)
        return batch

    def masked_tokens(self, backbone: Backbone, batch, generator: Optional[torch.Generator] = None
                      ) -> tuple[Tokens, Tensor]:
        """The tokens of ``batch`` with only the visible ones embedded, and the hidden mask (T,)."""
        tokens = backbone.group(batch)
        hidden = draw_mask(tokens.ptr, self.mask_ratio, generator)
        return backbone.embed(tokens, batch, visible=~hidden), hidden

    def predict(self, backbone: Backbone, tokens: Tokens, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible tokens and decode the hidden groups: normalised offsets (G, K, 3),
        log-energies (G, K), log group radii (G,)."""
        visible_features = backbone.encode(tokens, keep_mask=~hidden)
        return self.decoder(tokens, visible_features, hidden)

    def loss(self, backbone: Backbone, batch, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        if self.training and self.augment:
            batch = augment_by_symmetry(batch, generator if generator is None or generator.device.type == "cpu" else None)
        if self.training and self.condition_dropout > 0:
            batch = self.drop_conditions(batch, generator)
        tokens, hidden = self.masked_tokens(backbone, batch, generator)
        predicted = self.predict(backbone, tokens, hidden)
        offset, log_energy, valid, log_scale = hidden_group_targets(tokens, hidden, self.group_size)
        if not valid.any():  # every event has a single token: nothing to rebuild
            zero = predicted[0].sum() * 0.0
            terms = {name: zero for name in self.weights}
        else:
            terms = mpm_terms(*predicted, offset, log_energy, valid, log_scale, huber_delta=self.huber_delta,
                              energy_weighted_chamfer=self.energy_weighted_chamfer)
        terms["loss"] = sum(self.weights[name] * terms[name] for name in self.weights)
        terms["hidden_fraction"] = hidden.float().mean().detach()
        return terms
