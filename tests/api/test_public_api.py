"""pcfm as the README shows it: the top-level verbs (twice, in one process), the README's code
blocks (at small sizes), the deprecated module paths, and progress that reaches a log file."""
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pcfm
from tests.conftest import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"

#: README text -> what the test runs instead: the README's sizes, cut to seconds. A README edit
#: that drops one of these fails the test, so that the two are updated together.
SMALL_SIZES = {
    'simulate_showers(geo, 1000,': 'simulate_showers(geo, 60,',
    'max_steps=1000, workdir="runs/mpm")': 'max_steps=2, batch_points=4000, workdir="runs/mpm")',
    # a few steps of diffusion on low-energy showers (sqrt energy transform) make showers that
    # land in the cells; a 2-step model of the default data scatters its points outside them
    'max_steps=5000, workdir="runs/diff")': 'max_steps=3, n_events=24, batch_points=600, workdir="runs/diff", '
                                            'data_options={"energy_range": (100.0, 300.0)}, objective_options='
                                            '{"diffusion": {"energy_transform": {"kind": "power", "exponent": 0.5}}})',
    'energies=[1e4] * 100,': 'energies=[200.0] * 20, steps=4,',
    'report_path="report.json")': 'report_path="report.json", classifier_epochs=2)',
    'n_labels=100, mode="layerwise")': 'n_labels=20, mode="layerwise", n_events=60, max_steps=2)',
}


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (module state of this process does not leak in)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_top_level_verbs_stay_functions_when_their_modules_are_imported():
    result = run_python("""
        import inspect, pcfm
        first = [pcfm.pretrain, pcfm.finetune, pcfm.generate, pcfm.evaluate]
        import pcfm.api, pcfm.api.pretraining, pcfm.api.finetuning, pcfm.api.generation, pcfm.api.evaluation
        from pcfm.api import generate, evaluate
        again = [pcfm.pretrain, pcfm.finetune, pcfm.generate, pcfm.evaluate]
        assert all(inspect.isfunction(f) for f in first + again), [type(f) for f in first + again]
        assert first == again and pcfm.generate is generate and pcfm.evaluate is evaluate
        assert sorted(n for n in pcfm.__all__ if n != "__version__") == ["evaluate", "finetune", "generate", "pretrain"]
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_unknown_top_level_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'pretrian'"):
        pcfm.pretrian


def test_old_module_paths_warn_and_keep_working():
    result = run_python("""
        import warnings
        import pcfm
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from pcfm.api_finetune import finetune, LabelledView
            from pcfm.generate import generate
            import pcfm.evaluate
            from pcfm.quickstart import run_quickstart
        import pcfm.api
        moved = [str(w.message) for w in caught if "deprecated" in str(w.message) and "pcfm" in str(w.message)]
        assert len(moved) == 4, moved
        assert finetune is pcfm.api.finetune and generate is pcfm.api.generate
        assert LabelledView is pcfm.api.LabelledView and run_quickstart is pcfm.api.run_quickstart
        # importing the old modules rebinds pcfm.generate / pcfm.evaluate to them: still callable
        assert callable(pcfm.generate) and callable(pcfm.evaluate)
        try:
            pcfm.evaluate("missing.h5", "missing.h5")
        except Exception as error:  # the call reached evaluate(), which names the missing file
            assert "missing.h5" in str(error), error
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_readme_code_blocks_run_and_the_verbs_run_twice(tmp_path, monkeypatch, capsys):
    blocks = readme_python_blocks()
    assert len(blocks) >= 3, "the README's python blocks moved: update this test"
    code = "\n".join(blocks)
    for old, new in SMALL_SIZES.items():
        assert old in code, f"README no longer contains {old!r}: update SMALL_SIZES"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    gen, report, res = namespace["gen"], namespace["report"], namespace["res"]
    assert len(gen.showers) == 20 and (tmp_path / "gen.h5").is_file() and (tmp_path / "report.md").is_file()
    assert 0.0 <= report["classifier"]["high_level"]["auc"] <= 1.0 and np.isfinite(report["fpd"])
    assert 0.0 <= res.metrics["accuracy"] <= 1.0
    # the second call of each verb in the same process (once broke: pcfm.generate became a module)
    again = pcfm.generate(namespace["result"].checkpoint_path, "calochallenge-ds2", energies=[200.0] * 12, steps=4,
                          out="gen2.h5", seed=1)
    assert len(again.showers) == 12
    second = pcfm.evaluate("gen2.h5", "ds2_electrons.h5", classifier=False)
    assert second["n_generated"] == 12 and second["classifier"] is None
    out = capsys.readouterr().out
    assert "pretrain: step 2/2 (100%)" in out  # captured output is not a terminal: progress lines


def test_progress_lines_every_few_percent_when_output_is_not_a_terminal(tmp_path, capsys):
    from pcfm.data import ShowerDataset
    from pcfm.sim import simulate_showers

    showers = ShowerDataset(simulate_showers("calochallenge-ds2", 16, energy=(100.0, 300.0), seed=0))
    kwargs = dict(data=showers, model="tiny", batch_points=600, val_fraction=0.25, val_every_n_steps=20,
                  checkpoint_every_n_steps=20, workdir=tmp_path, accelerator="cpu")
    pcfm.pretrain("mpm", max_steps=20, **kwargs)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pretrain: ")]
    steps = [int(m.group(1)) for line in lines if (m := re.match(r"pretrain: step (\d+)/20 \(", line))]
    assert steps == [1, *range(2, 21, 2)] or steps == list(range(1, 21)), lines  # one every 5 %, and the first
    assert re.search(r"pretrain: step 20/20 \(100%\)  loss \d+\.\d{4}  \d+\.\d\d steps/s  0s left", "\n".join(lines))
    assert any(line.startswith("pretrain: step 20: val/loss ") for line in lines)
    pcfm.pretrain("mpm", max_steps=30, **kwargs)  # a resumed run says so, and counts its own steps
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pretrain: ")]
    assert lines[0] == "pretrain: resumed at step 20/30"
    assert "pretrain: step 21/30 (70%)" in lines[1]
