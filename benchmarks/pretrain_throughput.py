"""Masked point modelling training throughput: pcfm's ragged batches against a padded baseline.

One training step = ``MaskedPointModelling.loss`` (tokenise, mask 60% of each event's tokens,
encode the visible ones, decode the hidden groups) + backward + AdamW step, on one fixed batch
filled up to ``--batch-points`` points:

* "showers": simulated calochallenge-ds2 showers (electrons, photons, pions, 1-100 GeV);
* "lartpc": simulated LArTPC events grown to ``--lartpc-points`` (default 5000-20000) points.

Variants, same model and same initial weights (seeded), same batch:

* "ragged" (pcfm as is): tokens concatenated over events, global attention through
  ``pcfm.ops.varlen_attention`` (backend "auto": FlashAttention / Triton on CUDA);
* "padded": what existing point-cloud MAE code does. Inside :func:`padded_global_attention`,
  ``pcfm.nn.GlobalAttention.forward`` is swapped (``unittest.mock.patch.object`` on the class,
  restored on exit, pcfm/nn itself untouched) for :func:`padded_forward`: the tokens of each
  event are padded with ``torch_geometric.utils.to_dense_batch`` to ``(B, Lmax)``, q, k, v become
  ``(B, H, Lmax, D)`` and ``F.scaled_dot_product_attention`` runs with an additive mask: the
  model's distance penalty ``-slope_h |pos_i - pos_j|`` and ``-inf`` on padded keys. Every block
  of the encoder and of the decoder is affected; everything else is the same code.

Before timing, each batch kind checks on its first events that both variants give the same loss
and gradients (float32, same weights, same mask from a seeded generator); the relative
differences are recorded. Timing: after ``warmup`` steps (the first one, with kernel
compilation, is timed apart), the median of ``--steps`` synchronised steps; events/s and
points/s follow from it. Peak memory: ``torch.cuda.max_memory_allocated()`` over the timed steps
(model, optimiser state and batch included); not measured on CPU. On CUDA the steps run under
bf16 autocast. A row that fails records "error: ..." and the run goes on; a row that would
start after ``--budget`` seconds is skipped with the reason; results are rewritten after every
row.

Target (issue 4, H100): ragged events/s >= 2x padded on LArTPC-sized events. Token counts
follow the event sizes (a token per ``prod(stages)`` points, every point tokenised), so events
of different sizes have different token counts, which is where padding costs.

    python benchmarks/pretrain_throughput.py [--device cuda|cpu] [--model tiny|small|base]
        [--batch-points N] [--lartpc-points LO HI] [--steps N] [--quick]
        [--only showers|lartpc] [--budget SECONDS] [--out-dir DIR] [--threads N]

Output: DIR/pretrain_throughput.json and DIR/pretrain_throughput.md (default
benchmarks/results/, ``_cpu`` appended to the names for a CPU run).

Why one module of this length: the padded baseline, the batches both arms share, the
interleaved timing loop and the report are one measurement; a reader checks the ratio by
reading them together.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import Batch
from torch_geometric.utils import to_dense_batch

from _common import RESULTS_DIR, announce, markdown_table, write_results
from pcfm.io import atomic_path
from pcfm.engine.data import pretraining_item, simulate_pretraining_events
from pcfm.nn import BACKBONE_PRESETS, Backbone, GlobalAttention
from pcfm.tasks.mpm import MaskedPointModelling, draw_mask

BATCH_KINDS = ("showers", "lartpc")
GEOMETRIES = {"showers": "calochallenge-ds2", "lartpc": "lartpc-768"}
VARIANTS = ("ragged", "padded")
#: Events of the loss-equivalence check (the first of the batch).
CHECK_EVENTS = 4
#: Longest the timed steps of one row may run once 3 are done (seconds).
TIMING_CAP_S = 60.0
#: Budget a row needs to start when nothing has run yet (seconds).
FIRST_ROW_ESTIMATE_S = 30.0
#: Target of issue 4 on an H100: ragged events/s over padded events/s on LArTPC events.
TARGET_SPEEDUP = 2.0


@dataclass
class Options:
    device: torch.device
    model: str = "small"
    batch_points: int = 500_000
    lartpc_points: tuple[int, int] = (5000, 20_000)
    steps: int = 10
    warmup: int = 2
    budget_s: float = 480.0
    only: Optional[str] = None
    seed: int = 0
    lr: float = 5e-4

    @property
    def autocast(self) -> bool:
        return self.device.type == "cuda"


# ----------------------------------------------------------------------------- padded baseline


def padded_forward(self: GlobalAttention, x: Tensor, pos: Tensor, ptr: Tensor) -> Tensor:
    """``GlobalAttention.forward`` on padded ``(B, H, Lmax, D)`` tensors with SDPA (module docstring)."""
    counts = ptr[1:] - ptr[:-1]
    num_events = counts.numel()
    batch = torch.repeat_interleave(torch.arange(num_events, device=x.device), counts)
    qkv, valid = to_dense_batch(self.qkv(x), batch, batch_size=num_events)  # (B, L, 3C), (B, L)
    q, k, v = qkv.unflatten(2, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D) each
    dense_pos, _ = to_dense_batch(pos.float(), batch, batch_size=num_events)
    distance = torch.cdist(dense_pos, dense_pos, compute_mode="donot_use_mm_for_euclid_dist")  # (B, L, L)
    bias = -self.distance_slope[None, :, None, None] * distance[:, None]  # (B, H, L, L) float32
    bias = bias.masked_fill(~valid[:, None, None, :], -math.inf).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return self.out(out.transpose(1, 2).flatten(2)[valid])


@contextlib.contextmanager
def padded_global_attention():
    """Within the block, every GlobalAttention computes on padded tensors (:func:`padded_forward`)."""
    with mock.patch.object(GlobalAttention, "forward", padded_forward):
        yield


def variant_context(variant: str):
    return padded_global_attention() if variant == "padded" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- batches


@dataclass
class BatchSet:
    """A training batch of one kind and how it was made."""

    kind: str
    batch: Batch
    sizes: list[int]
    simulate_s: float

    @property
    def events(self) -> int:
        return len(self.sizes)

    @property
    def points(self) -> int:
        return sum(self.sizes)


def make_batch(kind: str, options: Options) -> BatchSet:
    """Simulated events of ``kind``, in simulation order, while they fit in ``options.batch_points``
    (at least one event); events with fewer than 2 points are left out."""
    start = time.perf_counter()
    lo, hi = options.lartpc_points
    guess = (lo + hi) / 2 if kind == "lartpc" else 800.0  # mean points, for the chunk size
    extra = {"lartpc_points": tuple(options.lartpc_points)} if kind == "lartpc" else {}
    items, total, chunk = [], 0, 0
    while True:
        n = max(1, math.ceil(1.2 * (options.batch_points - total) / guess))
        dataset = simulate_pretraining_events(GEOMETRIES[kind], n, seed=options.seed + 1000 * chunk, **extra)
        chunk += 1
        for i in range(len(dataset)):
            data = dataset[i]
            if data.num_nodes < 2:
                continue
            if items and total + data.num_nodes > options.batch_points:
                return finish_batch(kind, items, time.perf_counter() - start, options.device)
            items.append(pretraining_item(data, len(items)))
            total += data.num_nodes


def finish_batch(kind: str, items: list, simulate_s: float, device: torch.device) -> BatchSet:
    batch = Batch.from_data_list(items).to(device)
    return BatchSet(kind, batch, [item.num_nodes for item in items], simulate_s)


def head_batch(batch_set: BatchSet, events: int) -> Batch:
    """The first ``events`` events of a batch, as a batch."""
    return Batch.from_data_list(batch_set.batch.to_data_list()[:events])


# ----------------------------------------------------------------------------- model and steps


def build(options: Options) -> tuple[Backbone, MaskedPointModelling, torch.optim.Optimizer]:
    """Backbone + MPM objective with seeded weights (the same for both variants) and AdamW."""
    torch.manual_seed(options.seed)
    backbone = Backbone.from_preset(options.model)
    objective = MaskedPointModelling(backbone.config)
    backbone.to(options.device)
    objective.to(options.device)
    parameters = list(backbone.parameters()) + list(objective.parameters())
    return backbone, objective, torch.optim.AdamW(parameters, lr=options.lr)


def mask_generator(options: Options) -> torch.Generator:
    """The masks' random numbers: a fresh seeded CPU generator, so both variants hide the same tokens."""
    return torch.Generator().manual_seed(options.seed)


def train_step(backbone, objective, optimizer, batch: Batch, options: Options) -> Tensor:
    """One MPM training step; returns the (detached) loss."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(options.device.type, dtype=torch.bfloat16, enabled=options.autocast):
        loss = objective.loss(backbone, batch, mask_generator(options))["loss"]
    loss.backward()
    optimizer.step()
    return loss.detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def token_stats(backbone: Backbone, objective: MaskedPointModelling, batch: Batch, options: Options) -> dict:
    """Tokens per event and the share of padding in the (B, Lmax) tensors of encoder and decoder."""
    with torch.no_grad():
        tokens = backbone.group(batch)
        hidden = draw_mask(tokens.ptr, objective.mask_ratio, mask_generator(options))
    counts = (tokens.ptr[1:] - tokens.ptr[:-1]).cpu()
    visible = torch.bincount(tokens.batch[~hidden].cpu(), minlength=counts.numel())
    return {"tokens": int(counts.sum()), "tokens_per_event_min": int(counts.min()),
            "tokens_per_event_max": int(counts.max()), "padding_share_encoder": padding_share(visible),
            "padding_share_decoder": padding_share(counts)}


def padding_share(counts: Tensor) -> float:
    """Share of padding slots when events of ``counts`` tokens are padded to the longest."""
    slots = counts.numel() * int(counts.max()) if counts.numel() else 0
    return 1.0 - float(counts.sum()) / slots if slots else 0.0


# ----------------------------------------------------------------------------- check


def relative_error(got: Tensor, want: Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30))


def equivalence_check(batch_set: BatchSet, options: Options) -> dict:
    """Loss and gradients of both variants in float32 on the first CHECK_EVENTS events."""
    batch = head_batch(batch_set, CHECK_EVENTS).to(options.device)
    results = {}
    for variant in VARIANTS:
        backbone, objective, _ = build(options)
        with variant_context(variant):
            loss = objective.loss(backbone, batch, mask_generator(options))["loss"]
            loss.backward()
        grads = torch.cat([p.grad.flatten() for m in (backbone, objective) for p in m.parameters()
                           if p.grad is not None])
        results[variant] = (loss.detach(), grads)
    (loss_r, grad_r), (loss_p, grad_p) = results["ragged"], results["padded"]
    return {"check_events": batch.num_graphs, "loss_ragged": float(loss_r), "loss_padded": float(loss_p),
            "loss_rel_diff": abs(float(loss_r) - float(loss_p)) / max(abs(float(loss_r)), 1e-30),
            "grad_rel_diff": relative_error(grad_p, grad_r) if grad_p.shape == grad_r.shape else math.inf}


# ----------------------------------------------------------------------------- rows


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


@dataclass
class Run:
    options: Options
    json_path: Path
    command: str
    machine: dict
    rows: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.options.budget_s - self.elapsed()

    def save(self) -> None:
        write_results("pretrain_throughput", self.command, self.machine, self.rows, self.json_path)


def measure(variant: str, batch_set: BatchSet, run: Run) -> dict:
    """Warm up, then time the steps of one variant on one batch (errors are the caller's)."""
    options, device = run.options, run.options.device
    backbone, objective, optimizer = build(options)
    row = token_stats(backbone, objective, batch_set.batch, options)
    with variant_context(variant):
        start = time.perf_counter()
        loss = train_step(backbone, objective, optimizer, batch_set.batch, options)
        synchronize(device)
        row["first_step_s"] = time.perf_counter() - start
        for _ in range(options.warmup - 1):
            train_step(backbone, objective, optimizer, batch_set.batch, options)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, loop_start = [], time.perf_counter()
        for step in range(options.steps):
            start = time.perf_counter()
            loss = train_step(backbone, objective, optimizer, batch_set.batch, options)
            synchronize(device)
            times.append(time.perf_counter() - start)
            if step >= 2 and time.perf_counter() - loop_start > TIMING_CAP_S:
                break
    seconds = statistics.median(times)
    row.update(steps_timed=len(times), ms_per_step=1e3 * seconds, events_per_s=batch_set.events / seconds,
               points_per_s=batch_set.points / seconds, last_loss=float(loss))
    if not math.isfinite(row["last_loss"]):
        row["status"] = f"non-finite loss {row['last_loss']}"
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def run_kind(kind: str, run: Run, estimate: list) -> None:
    """Batch, equivalence check, then the two timed variants of one batch kind."""
    options = run.options
    base = {"kind": kind, "model": options.model}
    try:
        batch_set = make_batch(kind, options)
    except Exception as error:  # noqa: BLE001 - recorded, the run goes on
        run.rows.append({**base, "section": "batch", "status": f"error: {describe(error)}"})
        run.save()
        return
    base.update(events=batch_set.events, points=batch_set.points)
    print(f"{kind}: {batch_set.events} events, {batch_set.points} points "
          f"({min(batch_set.sizes)}-{max(batch_set.sizes)} per event), simulated in {batch_set.simulate_s:.1f} s",
          flush=True)
    check = {**base, "section": "check"}
    try:
        check.update(equivalence_check(batch_set, options), status="ok")
    except Exception as error:  # noqa: BLE001
        check["status"] = f"error: {describe(error)}"
    run.rows.append(check)
    run.save()
    for variant in VARIANTS:
        row = {**base, "section": "throughput", "variant": variant}
        if run.left() < estimate[0]:
            row["status"] = f"skipped: budget ({run.left():.0f} s left, about {estimate[0]:.0f} s needed)"
        else:
            start = time.perf_counter()
            try:
                row.update(measure(variant, batch_set, run))
                row.setdefault("status", "ok")
            except Exception as error:  # noqa: BLE001 - out of memory included
                row["status"] = f"error: {describe(error)}"
            estimate[0] = max(time.perf_counter() - start, 1.0)
            gc.collect()
            if options.device.type == "cuda":
                torch.cuda.empty_cache()
        run.rows.append(row)
        run.save()
        print(f"  {variant}: {row.get('status')}"
              + (f", {row['events_per_s']:.1f} events/s" if "events_per_s" in row else ""), flush=True)


def verdicts(rows: list, options: Options) -> list[dict]:
    """Ragged / padded events/s per batch kind; the LArTPC one is the issue's target."""
    found = {(row["kind"], row["variant"]): row for row in rows if row.get("section") == "throughput"}
    out = []
    for kind in BATCH_KINDS:
        ragged, padded = found.get((kind, "ragged")), found.get((kind, "padded"))
        if ragged is None and padded is None:
            continue
        entry = {"section": "verdict", "kind": kind,
                 "target": f"{kind}: ragged events/s / padded events/s" + (f" >= {TARGET_SPEEDUP:g}" if kind == "lartpc"
                                                                          else " (no target)")}
        if not (ragged and padded and "events_per_s" in ragged and "events_per_s" in padded):
            entry["verdict"] = "not evaluated (a row is missing)"
        else:
            entry["measured"] = ragged["events_per_s"] / padded["events_per_s"]
            if options.device.type != "cuda":
                entry["verdict"] = "not evaluated (CPU run)"
            elif kind == "lartpc":
                entry["verdict"] = "PASS" if entry["measured"] >= TARGET_SPEEDUP else "FAIL"
            else:
                entry["verdict"] = "measured"
        out.append(entry)
    return out


def run_benchmark(options: Options, json_path: Path, command: str, machine: dict) -> Run:
    run = Run(options, json_path, command, machine)
    estimate = [FIRST_ROW_ESTIMATE_S if options.device.type == "cuda" else 1.0]
    for kind in BATCH_KINDS:
        if options.only in (None, kind):
            run_kind(kind, run, estimate)
    run.rows += verdicts(run.rows, options)
    run.save()
    with atomic_path(json_path.with_suffix(".md")) as tmp:
        tmp.write_text(report(run) + "\n")
    return run


# ----------------------------------------------------------------------------- report


COLUMNS = [("variant", "variant", ""), ("batch", "kind", ""), ("events", "events", "d"), ("points", "points", "d"),
           ("tokens/event", "tokens_range", ""), ("padding enc/dec", "padding", ""),
           ("events/s", "events_per_s", ".1f"), ("points/s", "points_per_s", ".3g"), ("ms/step", "ms_per_step", ".1f"),
           ("peak GiB", "peak_gib", ".2f"), ("first step s", "first_step_s", ".1f"), ("status", "status", "")]
CHECK_COLUMNS = [("batch", "kind", ""), ("events", "check_events", "d"), ("loss ragged", "loss_ragged", ".6g"),
                 ("loss padded", "loss_padded", ".6g"), ("loss rel diff", "loss_rel_diff", ".1e"),
                 ("grad rel diff", "grad_rel_diff", ".1e"), ("status", "status", "")]


def table_rows(rows: list) -> list[dict]:
    out = []
    for row in rows:
        if row.get("section") != "throughput":
            continue
        row = dict(row)
        if "tokens_per_event_min" in row:
            row["tokens_range"] = f"{row['tokens_per_event_min']}-{row['tokens_per_event_max']}"
            row["padding"] = f"{row['padding_share_encoder']:.0%} / {row['padding_share_decoder']:.0%}"
        out.append(row)
    return out


def report(run: Run) -> str:
    options = run.options
    device = run.machine.get("gpu", options.device.type)
    tokens = f"tokens of at most {BACKBONE_PRESETS[options.model].group_size} points"
    lines = ["## Masked point modelling training throughput (`benchmarks/pretrain_throughput.py`)", "",
             f"`{run.command}` — {device}, torch {torch.__version__}, model {options.model} ({tokens}), "
             f"{'bf16 autocast' if options.autocast else 'float32'}, batches of up to {options.batch_points} points "
             f"(LArTPC events {options.lartpc_points[0]}-{options.lartpc_points[1]} points), "
             f"median of up to {options.steps} steps, {run.elapsed():.0f} s in all.", ""]
    if options.device.type != "cuda":
        lines += ["**CPU run at tiny sizes: these numbers test the script; CPU numbers are not the target.**", ""]
    lines += ["One step: MPM loss (tokenise, mask 60%, encode, decode) + backward + AdamW. ragged: pcfm as is; "
              "padded: global attention on (B, H, Lmax, D) with SDPA and a key-padding + distance-bias mask. "
              "Padding share: 1 - tokens / (B x Lmax) in the encoder (visible tokens) and decoder (all tokens).", "",
              markdown_table(table_rows(run.rows), COLUMNS), "",
              "Same loss before timing (float32, same weights and masks, first events):", "",
              markdown_table([r for r in run.rows if r.get("section") == "check"], CHECK_COLUMNS), ""]
    failed = [r for r in run.rows if r.get("section") == "batch"]
    lines += [f"- batch {r['kind']}: {r['status']}" for r in failed]
    lines.append("Ratios and target (H100):")
    for entry in (r for r in run.rows if r.get("section") == "verdict"):
        measured = f" — measured {entry['measured']:.2f}x" if "measured" in entry else ""
        lines.append(f"- {entry['target']}: **{entry['verdict']}**{measured}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def parse_options(argv: Optional[list[str]] = None) -> tuple[Options, Optional[Path]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--model", choices=("tiny", "small", "base"), help="default: small on CUDA, tiny on CPU")
    parser.add_argument("--batch-points", type=int, help="point budget of a batch (default 500000 CUDA, 3000 CPU)")
    parser.add_argument("--lartpc-points", type=int, nargs=2, metavar=("LO", "HI"),
                        help="points per LArTPC event (default 5000 20000 CUDA, 500 1500 CPU)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10 CUDA, 2 CPU; 3 / 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps and one warm-up step")
    parser.add_argument("--only", choices=BATCH_KINDS)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which no row starts (default 480)")
    parser.add_argument("--out-dir", type=Path, help="write pretrain_throughput.json and .md there")
    parser.add_argument("--threads", type=int, help="CPU threads (default 1 on CPU: at tiny sizes more threads only "
                                                    "add synchronisation, and stall when another process shares "
                                                    "the cores; torch's default on CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    gpu = device.type == "cuda"
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    steps = args.steps or ((3 if args.quick else 10) if gpu else (1 if args.quick else 2))
    options = Options(device=device, model=args.model or ("small" if gpu else "tiny"),
                      batch_points=args.batch_points or (500_000 if gpu else 3000),
                      lartpc_points=tuple(args.lartpc_points or ((5000, 20_000) if gpu else (500, 1500))),
                      steps=steps, warmup=1 if args.quick else 2,
                      budget_s=args.budget, only=args.only)
    return options, args.out_dir


def default_json_path(options: Options, out_dir: Optional[Path]) -> Path:
    name = "pretrain_throughput" if options.device.type == "cuda" else "pretrain_throughput_cpu"
    return (Path(out_dir) / "pretrain_throughput.json") if out_dir else RESULTS_DIR / f"{name}.json"


def main(argv: Optional[list[str]] = None) -> Run:
    options, out_dir = parse_options(argv)
    command, machine = announce()
    run = run_benchmark(options, default_json_path(options, out_dir), command, machine)
    print()
    print(report(run))
    return run


if __name__ == "__main__":
    main()
