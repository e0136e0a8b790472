"""What every benchmark script shares: the machine description, the command line, the JSON
output (written atomically to benchmarks/results/) and the markdown table.

Every result file records the command that produced it and the machine it ran on, so that a
number in RESULTS.md can be traced and reproduced.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pcfm.io import atomic_path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """CPU model, cores, load, library versions, and the GPU if torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work slows the figures
        "platform": platform.platform(), "python": platform.python_version(),
        "numpy": np.__version__, "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def command_line() -> str:
    return " ".join(["python"] + sys.argv)


def announce() -> tuple[str, dict]:
    """Print and return the command and the machine, before any measurement."""
    command, machine = command_line(), machine_info()
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    return command, machine


def write_results(name: str, command: str, machine: dict, rows: list[dict], out: str | Path | None = None) -> Path:
    """Write ``{"command", "machine", "results"}`` as JSON (default benchmarks/results/NAME.json)."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"command": command, "machine": machine, "results": rows}, indent=2) + "\n")
    print(f"\nwritten {path}")
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as a markdown table; ``columns`` are (header, key, format spec)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format(row[k], f) if row.get(k) is not None else "-" for _, k, f in columns) + " |")
    return "\n".join(lines)


def parse_bool(text: str) -> bool:
    """A command-line true / false."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_json_or_text(text: str):
    """A model preset name, or a JSON object of options (``{"depth": 2}``)."""
    return json.loads(text) if text.strip().startswith("{") else text


def add_config_options(parser: argparse.ArgumentParser, config_class, help_texts: Mapping[str, str],
                       special: Mapping[str, Mapping[str, Any]] = {}) -> None:
    """One ``--field-name`` option per field of a benchmark's ``Config`` dataclass.

    Every option defaults to None, meaning "keep the preset's value" (:func:`apply_config_options`).
    The argparse type follows the field's default (bool, list: ``nargs="+"``, tuple: ``nargs=2``);
    ``special`` gives the ``add_argument`` keywords of a field whose default does not say (None).
    """
    defaults = config_class()
    for item in dataclasses.fields(config_class):
        value, flag = getattr(defaults, item.name), "--" + item.name.replace("_", "-")
        options = special.get(item.name)
        if options is None:
            if isinstance(value, bool):
                options = {"type": parse_bool}
            elif isinstance(value, (list, tuple)):
                kind = str if isinstance(value[0], str) else (float if isinstance(value[0], float) else int)
                options = {"type": kind, "nargs": 2 if isinstance(value, tuple) else "+"}
            else:
                options = {"type": type(value)}
        parser.add_argument(flag, default=None, help=help_texts[item.name], **options)


def apply_config_options(config, args, tuple_fields: Sequence[str] = ()):
    """``config`` with the options given on the command line (:func:`add_config_options`) set;
    a field whose preset is a tuple (or named in ``tuple_fields``) gets a tuple."""
    for item in dataclasses.fields(config):
        value = getattr(args, item.name)
        if value is not None:
            as_tuple = isinstance(getattr(config, item.name), tuple) or item.name in tuple_fields
            setattr(config, item.name, tuple(value) if as_tuple else value)
    if getattr(config, "threads", None) == 0:
        config.threads = None
    return config


def log(text: str) -> None:
    """A progress line, flushed at once (long runs are watched through a pipe or a log file)."""
    print(text, flush=True)


def fmt(value) -> str:
    """A table cell: 3 decimals, "-" for a value not measured."""
    return "-" if value is None else f"{value:.3f}"


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists), for comparing recorded settings."""
    return json.loads(json.dumps(value))


def device_for(accelerator: str) -> str:
    """The torch device of a Lightning ``accelerator`` setting: the GPU when asked for and present."""
    return "cpu" if accelerator == "cpu" or not torch.cuda.is_available() else "cuda"


def save_png(fig, path: Path) -> str:
    """A matplotlib figure as a PNG file, laid out tight and written atomically."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return str(path)
