"""benchmarks/mpm_conditioning.py: the same masks with the event conditions given and hidden."""
import json

import pytest

from pcfm.api import pretrain
from tests.benchmark_loader import load_benchmark

bench = load_benchmark("mpm_conditioning")


def test_compares_the_same_masks_with_and_without_the_conditions(tmp_path):
    run = pretrain("mpm", geometry="calochallenge-ds2", model={"preset": "tiny", "depth": 1}, n_events=16,
                   max_steps=2, batch_points=4000, val_fraction=0.0, workdir=tmp_path / "run", progress=False,
                   accelerator="cpu", data_options={"energy_range": (1e3, 5e3)})
    out = tmp_path / "conditioning.json"
    bench.main([str(run.checkpoint_path), "--n-events", "8", "--mask-seeds", "0", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    seeds = [r for r in rows if r["part"] == "seed"]
    assert [r["mask_seed"] for r in seeds] == [0, 1]
    terms = {r["term"]: r for r in rows if r["part"] == "term"}
    assert set(terms) == set(bench.TERMS)
    for name, row in terms.items():
        assert row["rise"] == pytest.approx(row["hidden"] - row["given"], abs=1e-9)
    # the same mask seed draws the same masks: a rerun repeats the loss exactly, another seed does not
    module = bench.PretrainModule.load_from_checkpoint(run.checkpoint_path, map_location="cpu").eval()
    events = bench.simulate_pretraining_events("calochallenge-ds2", 8, energy_range=(1e3, 5e3), seed=3)
    batch = bench.Batch.from_data_list([bench.pretraining_item(events[i], i) for i in range(len(events))])
    first, again = (bench.mpm_terms_on(module, [batch], 0, hide=False) for _ in range(2))
    assert first == again and bench.mpm_terms_on(module, [batch], 1, hide=False) != first
    assert out.with_suffix(".md").read_text().count("|") > 10
