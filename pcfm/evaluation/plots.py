"""PNG plots of generated against reference showers.

Plots need matplotlib, which pcfm does not depend on (the ``plots`` extra): without it
:func:`make_plots` writes nothing and says why, and the markdown summary (:mod:`pcfm.evaluation.report`) carries that line.
Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas (no pyplot, no display),
so a user's interactive backend and open figures are left alone. Every file is written
atomically (:func:`pcfm.io.atomic_path`).

The figures (reference in black, generated in orange):

* ``longitudinal_profile.png``: mean energy per layer, with the generated / reference ratio below;
* ``radial_profile.png``: mean energy per radial bin, summed over angles and layers on a regular
  mesh, one panel per layer on an irregular one (dataset 1), ratios below;
* ``energy_response.png``: the distribution of E_dep / E_inc and its mean against the incident
  energy, ratios below;
* ``feature_histograms.png``: per-layer high-level features (energy, centre of energy and width
  in r, x, y, sparsity) for up to :data:`N_GRID_LAYERS` layers spread over the depth;
* ``most_separating_features.png``: the :data:`N_FEATURE_PLOTS` features with the largest
  separation power.

Ratio error bars are statistical (standard errors of the means, Poisson counts in histograms),
from both samples. Histogram bins follow the separation power (reference quantile range,
outliers counted in the outer bins) over the range of both samples; an energy whose positive
values span more than two decades is binned and drawn on a log axis, its zeros left out and
their share written in the panel. Profiles spanning more than a decade get a log y axis.

Why one module of this length: one private function per figure, all sharing the ratio panel,
the error bars and the histogram edges; split by figure, those helpers would be imported back
into every file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pcfm.io import atomic_path
from pcfm.data.events import CaloShowers
from pcfm.evaluation.distances import histogram_edges
from pcfm.evaluation.features import apply_threshold
from pcfm.geometry.cylindrical import CylindricalGeometry

#: Features shown in the most-separating figure.
N_FEATURE_PLOTS = 12
#: Layers shown in the per-layer feature grid (all of them when there are no more).
N_GRID_LAYERS = 6
#: What each figure shows, in the order written; the markdown summary uses these as captions.
PLOT_CAPTIONS = {
    "longitudinal_profile": "Mean longitudinal profile: energy per layer (ratio generated / reference below)",
    "radial_profile": "Mean radial profile: energy per radial bin, summed over angles "
                      "(and over layers when all layers share one binning)",
    "energy_response": "Total energy response E_dep / E_inc: distribution and mean vs incident energy",
    "feature_histograms": "High-level features per layer: energy, centre of energy and width in r, x, y, sparsity",
    "most_separating_features": "The features with the largest separation power",
}
_REF_STYLE = dict(color="black", label="reference")
_GEN_STYLE = dict(color="C1", label="generated")



def make_plots(generated: CaloShowers, reference: CaloShowers, geometry: CylindricalGeometry,
               gen_features: dict, ref_features: dict, powers: dict,
               plots_dir: Path) -> tuple[list[Path], Optional[str]]:
    """Write the figures of :data:`PLOT_CAPTIONS` as PNG files into ``plots_dir``.

    Returns (files written, why some or all were not written, or None). A figure that fails to
    draw is named in the reason and the others are still written: a plotting problem must not
    cost the numbers of a long evaluation.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        return [], (f"matplotlib is not installed or does not import ({type(exc).__name__}: {exc}); "
                    "`pip install matplotlib` (the pcfm `plots` extra) enables them")

    def new_figure(**kwargs):
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)  # Agg whatever pyplot's backend is: no display needed
        return fig

    plots_dir.mkdir(parents=True, exist_ok=True)
    draw = {
        "longitudinal_profile": lambda: _longitudinal_figure(new_figure, geometry, gen_features, ref_features),
        "radial_profile": lambda: _radial_figure(new_figure, geometry, generated, reference),
        "energy_response": lambda: _response_figure(new_figure, generated, reference, gen_features, ref_features),
        "feature_histograms": lambda: _layer_grid_figure(new_figure, geometry, gen_features, ref_features, powers),
        "most_separating_features": lambda: _separating_figure(new_figure, gen_features, ref_features, powers),
    }
    written, failures = [], []
    for stem in PLOT_CAPTIONS:
        try:
            written.append(_save(draw[stem](), plots_dir / f"{stem}.png"))
        except Exception as exc:  # noqa: BLE001 - named in the results and the markdown
            failures.append(f"{stem}.png failed ({type(exc).__name__}: {exc})")
    return written, "; ".join(failures) or None


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _mean_and_error(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and its standard error along ``axis``."""
    n = values.shape[axis]
    return values.mean(axis=axis), values.std(axis=axis, ddof=1 if n > 1 else 0) / np.sqrt(n)


def _spans_decades(values: np.ndarray, decades: float = 2.0, min_count: int = 10) -> bool:
    """True when ``values`` are non-negative and the 1-99 % quantiles of their positive part
    (at least ``min_count`` values) are more than ``decades`` apart."""
    values = np.asarray(values, dtype=np.float64)
    positive = values[values > 0]
    if values.size == 0 or values.min() < 0 or positive.size < min_count:
        return False
    low, high = np.quantile(positive, [0.01, 0.99])
    return high > low * 10 ** decades


def _log_x_ticks(axes) -> None:
    """Readable labels on a log x axis: plain 1, 2, 5 x 10^k when it spans under two decades
    (matplotlib's default minor labels overlap there), else only the powers of ten."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    low, high = axes.get_xlim()
    if high < 100 * low:
        def label(value, _):
            mantissa = value / 10 ** np.floor(np.log10(value)) if value > 0 else 0
            return f"{value:g}" if np.isclose(mantissa, [1, 2, 5]).any() else ""
        axes.xaxis.set_major_formatter(FuncFormatter(label))
        axes.xaxis.set_minor_formatter(FuncFormatter(label))
    else:
        axes.xaxis.set_minor_formatter(NullFormatter())


def _ratio_panel(axes, x, generated, gen_error, reference, ref_error) -> None:
    """generated / reference at ``x`` with combined statistical errors, a line at 1, and
    arrows at the panel edge for ratios off its scale."""
    generated, reference = np.asarray(generated, float), np.asarray(reference, float)
    valid = (reference > 0) & (generated > 0)
    ratio = np.where(valid, generated / np.where(valid, reference, 1.0), np.nan)
    error = ratio * np.sqrt((np.asarray(gen_error) / np.where(valid, generated, 1.0)) ** 2
                            + (np.asarray(ref_error) / np.where(valid, reference, 1.0)) ** 2)
    finite = np.isfinite(ratio) & np.isfinite(error)
    # symmetric around 1, wide enough for every point and its error bar, at least +-0.05, at most [0, 3]
    span = float(np.clip(1.1 * (np.abs(ratio - 1.0) + error)[finite].max(), 0.05, 2.0)) if finite.any() else 0.5
    low, high = max(1.0 - span, 0.0), 1.0 + span
    axes.axhline(1.0, color="grey", linewidth=0.8)
    inside = (ratio >= low) & (ratio <= high)
    axes.errorbar(np.asarray(x)[inside], ratio[inside], yerr=error[inside], fmt="o", color="C1",
                  markersize=3, elinewidth=1, capsize=0)
    for off, edge, marker in ((ratio > high, high, "^"), (ratio < low, low, "v")):
        if off.any():
            axes.plot(np.asarray(x)[off], np.full(off.sum(), edge), marker, color="C3", markersize=5,
                      clip_on=False, linestyle="none")
    axes.set_ylim(low, high)
    axes.set_ylabel("gen / ref")
    axes.grid(alpha=0.3)


def _profile(fig, spec, edges, gen, gen_err, ref, ref_err, xlabel: str, ylabel: str, title: str = ""):
    """Two step profiles over ``edges`` in ``spec`` (a subplot spec), ratio panel below;
    returns (top, bottom) axes."""
    inner = spec.subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
    top = fig.add_subplot(inner[0])
    bottom = fig.add_subplot(inner[1], sharex=top)
    top.stairs(ref, edges, linewidth=1.5, baseline=None, **_REF_STYLE)
    top.stairs(gen, edges, linewidth=1.5, linestyle="--", baseline=None, **_GEN_STYLE)
    if _spans_decades(np.concatenate([ref, gen]), 1.0, min_count=2):
        top.set_yscale("log")
    if not (np.any(ref > 0) or np.any(gen > 0)):
        top.text(0.5, 0.75, "no energy in either sample", transform=top.transAxes, ha="center")
    top.set_ylabel(ylabel)
    top.tick_params(labelbottom=False)
    top.legend(fontsize=8)
    if title:
        top.set_title(title, fontsize=10)
    centres = 0.5 * (np.asarray(edges[:-1]) + np.asarray(edges[1:]))
    _ratio_panel(bottom, centres, gen, gen_err, ref, ref_err)
    bottom.set_xlabel(xlabel)
    return top, bottom


def _longitudinal_figure(new_figure: Callable, geometry: CylindricalGeometry, gen_features: dict, ref_features: dict):
    names = [f"layer{i}_energy" for i in geometry.layer_ids]
    gen_mean, gen_err = _mean_and_error(np.stack([gen_features[n] for n in names], axis=1))
    ref_mean, ref_err = _mean_and_error(np.stack([ref_features[n] for n in names], axis=1))
    fig = new_figure(figsize=(7, 5.5), layout="constrained")
    edges = np.arange(geometry.n_layers + 1) - 0.5
    top, bottom = _profile(fig, fig.add_gridspec(1, 1)[0], edges, gen_mean, gen_err, ref_mean, ref_err,
                           "layer", "mean energy per shower (MeV)",
                           f"{geometry.name}: longitudinal profile")
    ticks = np.arange(geometry.n_layers)
    step = max(1, geometry.n_layers // 15)
    bottom.set_xticks(ticks[::step], [str(i) for i in geometry.layer_ids[::step]])
    bottom.set_xlim(edges[0], edges[-1])
    return fig


def _radial_sums(showers: CaloShowers, geometry: CylindricalGeometry,
                 block_events: int = 1024) -> tuple[list, Optional[tuple]]:
    """Mean energy per shower in each radial bin (summed over angles) and its standard error:
    one (mean, error) per layer, and (mean, error) summed over layers when the mesh is regular
    (else None). Showers are thresholded and summed in blocks to bound memory."""
    n = len(showers)
    sums = [np.zeros((2, layer.n_r)) for layer in geometry.layers]
    total = np.zeros((2, geometry.layers[0].n_r)) if geometry.is_regular else None
    for start in range(0, n, block_events):
        cells = apply_threshold(showers.showers[start:start + block_events], geometry)
        rings = [layer_cells.sum(axis=1) for layer_cells in geometry.split_layers(cells)]  # (B, n_r) each
        for acc, ring in zip(sums, rings):
            acc += [ring.sum(axis=0), (ring ** 2).sum(axis=0)]
        if total is not None:
            ring = np.sum(rings, axis=0)
            total += [ring.sum(axis=0), (ring ** 2).sum(axis=0)]

    def mean_error(acc):
        mean = acc[0] / n
        variance = np.clip(acc[1] / n - mean ** 2, 0.0, None) * (n / max(n - 1, 1))
        return mean, np.sqrt(variance / n)

    return [mean_error(acc) for acc in sums], (mean_error(total) if total is not None else None)


def _radial_figure(new_figure: Callable, geometry: CylindricalGeometry, generated: CaloShowers,
                   reference: CaloShowers):
    gen_layers, gen_total = _radial_sums(generated, geometry)
    ref_layers, ref_total = _radial_sums(reference, geometry)
    ylabel = "mean energy per shower (MeV)"
    if gen_total is not None:  # one binning for all layers: the classic summed profile, in mm
        fig = new_figure(figsize=(7, 5.5), layout="constrained")
        _profile(fig, fig.add_gridspec(1, 1)[0], np.asarray(geometry.layers[0].r_edges_mm),
                 *gen_total, *ref_total, "r (mm)", ylabel,
                 f"{geometry.name}: radial profile (all layers)")
        return fig
    # layers binned differently (CaloChallenge dataset 1): one panel per layer, over bin number
    columns = min(4, geometry.n_layers)
    rows = -(-geometry.n_layers // columns)
    fig = new_figure(figsize=(4.2 * columns, 4.6 * rows), layout="constrained")
    grid = fig.add_gridspec(rows, columns)
    for i, layer in enumerate(geometry.layers):
        edges = np.arange(layer.n_r + 1)
        _, bottom = _profile(fig, grid[i // columns, i % columns], edges, *gen_layers[i], *ref_layers[i],
                             "r bin edges (mm; bins drawn equally wide)", ylabel if i % columns == 0 else "",
                             f"layer {layer.id}")
        step = max(1, layer.n_r // 8)
        bottom.set_xticks(edges[1::step], [f"{e:g}" for e in layer.r_edges_mm[1::step]], fontsize=7)
    fig.suptitle(f"{geometry.name}: radial profiles per layer (binnings differ)")
    return fig


def _fractions(values: np.ndarray, edges: np.ndarray, log: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Share of all showers in each bin (outliers in the outer bins; zeros left out on a log
    axis), its Poisson error, and the number of zeros left out."""
    values = np.asarray(values, dtype=np.float64)
    zeros = int((values <= 0).sum()) if log else 0
    shown = values[values > 0] if log else values
    counts, _ = np.histogram(np.clip(shown, edges[0], edges[-1]), bins=edges)
    return counts / len(values), np.sqrt(counts) / len(values), zeros


def _feature_edges(reference: np.ndarray, generated: np.ndarray, n_bins: int,
                   log_allowed: bool = True) -> tuple[np.ndarray, bool]:
    """Bin edges for one feature over both samples' 0.1-99.9 % quantile range (so that a shifted
    sample stays in view) and whether they are logarithmic (see the module docstring)."""
    if log_allowed and _spans_decades(reference):
        ranges = [np.quantile(v[v > 0], [0.001, 0.999]) for v in (reference, generated) if np.any(v > 0)]
        return np.geomspace(min(r[0] for r in ranges), max(r[1] for r in ranges), n_bins + 1), True
    both = [histogram_edges(v, n_bins) for v in (reference, generated)]
    return np.linspace(min(both[0][0], both[1][0]), max(both[0][-1], both[1][-1]), n_bins + 1), False


_UNITS = {"energy": "MeV", "centre": "mm", "width": "mm"}


def _feature_label(name: str) -> str:
    """Axis label of a feature name from :func:`~pcfm.evaluation.features.high_level_features`."""
    if name == "total_energy":
        return "total energy (MeV)"
    if name == "energy_ratio":
        return "E_dep / E_inc"
    layer, _, quantity = name.partition("_")
    if quantity == "sparsity":
        return f"{layer}: share of cells above threshold"
    words = quantity.split("_")
    unit = _UNITS.get(words[-1], "")
    return f"{layer}: {' '.join(words)}" + (f" ({unit})" if unit else "")


def _feature_histogram(axes, name: str, gen: np.ndarray, ref: np.ndarray, n_bins: int = 30) -> None:
    """Reference (grey filled) and generated (orange line) shares of showers per bin; on a log
    axis the shares of zeros, left out, are written in the panel."""
    # only energies: widths of one-cell layers come out as round-off (~1e-7 mm), not 0, and
    # would stretch a log axis over needless decades
    edges, log = _feature_edges(ref, gen, n_bins, log_allowed=name.endswith("energy"))
    zero_shares = []
    for values, style, fill in ((ref, _REF_STYLE, True), (gen, _GEN_STYLE, False)):
        share, _, zeros = _fractions(values, edges, log)
        zero_shares.append(zeros / len(values))
        if fill:
            axes.stairs(share, edges, fill=True, color="0.85")
        axes.stairs(share, edges, color=style["color"], linewidth=1.2, label=style["label"])
    if log:
        axes.set_xscale("log")
        _log_x_ticks(axes)
        if any(zero_shares):
            axes.text(0.02, 0.97, f"zero: ref {zero_shares[0]:.1%}, gen {zero_shares[1]:.1%}",
                      transform=axes.transAxes, fontsize=6, va="top")
    axes.set_xlabel(_feature_label(name), fontsize=8)
    axes.tick_params(labelsize=7)


def _response_figure(new_figure: Callable, generated: CaloShowers, reference: CaloShowers,
                     gen_features: dict, ref_features: dict):
    fig = new_figure(figsize=(12, 5), layout="constrained")
    grid = fig.add_gridspec(1, 2, wspace=0.3)

    # left: the distribution of E_dep / E_inc
    inner = grid[0].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
    top = fig.add_subplot(inner[0])
    bottom = fig.add_subplot(inner[1], sharex=top)
    ref, gen = ref_features["energy_ratio"], gen_features["energy_ratio"]
    edges, _ = _feature_edges(ref, gen, 50, log_allowed=False)
    shares = {}
    for values, style, fill in ((ref, _REF_STYLE, True), (gen, _GEN_STYLE, False)):
        share, error, _ = _fractions(values, edges, False)
        shares[style["label"]] = (share, error)
        if fill:
            top.stairs(share, edges, fill=True, color="0.85")
        top.stairs(share, edges, color=style["color"], linewidth=1.5,
                   label=f"{style['label']}: mean {values.mean():.4f}, RMS {values.std():.4f}")
    top.set_ylabel("fraction of showers")
    top.tick_params(labelbottom=False)
    top.legend(fontsize=8)
    top.set_title("energy response (outliers in the outer bins)", fontsize=10)
    _ratio_panel(bottom, 0.5 * (edges[1:] + edges[:-1]), *shares["generated"], *shares["reference"])
    bottom.set_xlabel("E_dep / E_inc")

    # right: mean response against incident energy (linearity)
    incident = np.concatenate([generated.incident_energies, reference.incident_energies]).astype(np.float64)
    levels = np.unique(incident)
    if len(levels) <= 20:  # discrete energies (dataset 1): one point per energy
        centres = levels
        assign = lambda e: np.searchsorted(levels, np.asarray(e, dtype=np.float64))  # noqa: E731
    else:
        bin_edges = np.geomspace(levels[0], levels[-1] * (1 + 1e-9), 11)
        centres = np.sqrt(bin_edges[1:] * bin_edges[:-1])
        assign = lambda e: np.clip(np.searchsorted(bin_edges, e, side="right") - 1, 0, 9)  # noqa: E731
    means = {}
    for showers, features, style in ((reference, ref_features, _REF_STYLE), (generated, gen_features, _GEN_STYLE)):
        index = assign(showers.incident_energies)
        stats = np.full((2, len(centres)), np.nan)
        for b in range(len(centres)):
            values = features["energy_ratio"][index == b]
            if len(values) >= 2:
                stats[:, b] = _mean_and_error(values)
        means[style["label"]] = stats
    inner = grid[1].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
    top = fig.add_subplot(inner[0])
    bottom = fig.add_subplot(inner[1], sharex=top)
    for label, style, marker in (("reference", _REF_STYLE, "o"), ("generated", _GEN_STYLE, "s")):
        top.errorbar(centres, means[label][0], yerr=means[label][1], fmt=marker + "-", markersize=4,
                     capsize=2, **style)
    top.set_xscale("log")
    _log_x_ticks(bottom)
    top.set_ylabel("mean E_dep / E_inc")
    top.tick_params(labelbottom=False)
    top.legend(fontsize=8)
    top.set_title("response vs incident energy", fontsize=10)
    _ratio_panel(bottom, centres, *means["generated"], *means["reference"])
    bottom.set_xlabel("incident energy E_inc (MeV)")
    return fig


def _grid_figure(new_figure: Callable, rows: int, columns: int, width: float, height: float):
    """A figure for a rows x columns grid of histograms (inches per panel), spaced by hand:
    constrained layout would double the drawing time of the many panels."""
    fig = new_figure(figsize=(width * columns, height * rows + 0.6))
    top = 1.0 - 0.6 / (height * rows + 0.6)
    fig.subplots_adjust(left=0.5 / (width * columns), right=0.99, bottom=0.45 / (height * rows),
                        top=top - 0.25 / (height * rows), wspace=0.3, hspace=0.55)
    return fig


def _grid_layers(geometry: CylindricalGeometry) -> list[int]:
    """Up to N_GRID_LAYERS layer ids spread evenly over the depth."""
    positions = np.unique(np.round(np.linspace(0, geometry.n_layers - 1, min(N_GRID_LAYERS, geometry.n_layers))))
    return [geometry.layer_ids[int(p)] for p in positions]


_GRID_QUANTITIES = ("energy", "r_centre", "r_width", "x_centre", "x_width", "y_centre", "y_width", "sparsity")


def _layer_grid_figure(new_figure: Callable, geometry: CylindricalGeometry, gen_features: dict,
                       ref_features: dict, powers: dict):
    layers = _grid_layers(geometry)
    fig = _grid_figure(new_figure, len(layers), len(_GRID_QUANTITIES), 2.6, 2.4)
    grid = fig.subplots(len(layers), len(_GRID_QUANTITIES), squeeze=False)
    for row, layer_id in zip(grid, layers):
        for axes, quantity in zip(row, _GRID_QUANTITIES):
            name = f"layer{layer_id}_{quantity}"
            _feature_histogram(axes, name, gen_features[name], ref_features[name])
            axes.set_title(f"sep. power {powers[name]:.3f}", fontsize=8)
        row[0].set_ylabel("fraction of showers", fontsize=8)
    fig.legend(*grid[0, 0].get_legend_handles_labels(), loc="upper right", ncols=2, fontsize=9)
    shown = "all layers" if len(layers) == geometry.n_layers else f"layers {', '.join(map(str, layers))} of {geometry.n_layers}"
    fig.suptitle(f"{geometry.name}: high-level features per layer ({shown})")
    return fig


def _separating_figure(new_figure: Callable, gen_features: dict, ref_features: dict, powers: dict):
    shown = sorted(powers, key=lambda n: -powers[n])[:N_FEATURE_PLOTS]
    columns = 4
    rows = -(-len(shown) // columns)
    fig = _grid_figure(new_figure, rows, columns, 3.6, 2.9)
    grid = fig.subplots(rows, columns, squeeze=False)
    for axes, name in zip(grid.ravel(), shown):
        _feature_histogram(axes, name, gen_features[name], ref_features[name])
        axes.set_title(f"{name}: sep. power {powers[name]:.3f}", fontsize=9)
    fig.legend(*grid[0, 0].get_legend_handles_labels(), loc="upper right", ncols=2, fontsize=9)
    for axes in grid[:, 0]:
        axes.set_ylabel("fraction of showers", fontsize=8)
    for axes in grid.ravel()[len(shown):]:
        axes.set_visible(False)
    fig.suptitle(f"the {len(shown)} features with the largest separation power")
    return fig
