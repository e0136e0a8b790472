"""Fine-tuning: the three tasks end to end, the training modes, label subsets, checkpoints, metrics."""
import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

import pcfm.data
import pcfm.sim
from tests.conftest import PROJECT_ROOT
from pcfm.api import backbone_config, pretrain
from pcfm.engine.data import simulate_pretraining_events
from pcfm.api import FinetuneDataModule, balanced_subset, finetune, pretrained_backbone
from pcfm.errors import DataError
from pcfm.finetuning import FinetuneModule, task_metrics
from pcfm.tasks.pretrain import read_checkpoint

FAST = dict(progress=False, val_fraction=0.0, batch_points=4000, log_every_n_steps=1)
SMALL_SHOWERS = dict(energy_range=(2e3, 2e4))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-step pretraining checkpoint of the tiny backbone."""
    workdir = tmp_path_factory.mktemp("pretrain")
    return pretrain(workdir=workdir, max_steps=2, n_events=24, val_fraction=0.0, batch_points=4000,
                    progress=False, data_options=SMALL_SHOWERS)


def test_classification_learns_electrons_from_pions_and_writes_metrics(tmp_path):
    result = finetune("classification", n_events=160, max_steps=25, batch_points=6000, lr=5e-4, workdir=tmp_path,
                      progress=False, val_fraction=0.0, log_every_n_steps=5,
                      data_options=dict(particles=("electron", "pion"), **SMALL_SHOWERS))
    metrics = result.metrics
    assert metrics["accuracy"] > 0.7, metrics
    assert set(metrics) == {"accuracy", "f1/electron", "f1/pion", "mean_f1", "n_train", "n_test"}
    assert (metrics["n_train"], metrics["n_test"]) == (128, 32)
    stored = json.loads(result.metrics_path.read_text())
    assert result.metrics_path == tmp_path / "metrics.json"
    assert stored["metrics"] == metrics and stored["task"] == "classification" and stored["mode"] == "full"
    assert result.checkpoint_path.is_file()
    reloaded = FinetuneModule.load_from_checkpoint(result.checkpoint_path)
    assert reloaded.hparams.task == "classification" and reloaded.hparams.mode == "full"
    trained = result.module.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in reloaded.state_dict().items())
    assert [row["step"] for row in result.history if "train/loss" in row] == [4, 9, 14, 19, 24]


def test_regression_reports_energy_resolution_and_angle(tmp_path):
    result = finetune("regression", n_events=60, max_steps=4, targets=("incident_energy", "theta"),
                      workdir=tmp_path, data_options=SMALL_SHOWERS, **FAST)
    keys = {"incident_energy/resolution", "incident_energy/bias", "theta/resolution", "theta/bias"}
    assert keys <= set(result.metrics)
    assert all(math.isfinite(result.metrics[key]) for key in keys)
    assert result.metrics["incident_energy/resolution"] > 0
    # The standardisation statistics are those of the training events' log energies.
    stored = json.loads(result.metrics_path.read_text())
    assert stored["targets"] == ["incident_energy", "theta"]
    mean_log_energy = result.module.task.mean[0].item()
    assert math.log(2e3) < mean_log_energy < math.log(2e4)


def test_energy_regression_starts_from_the_visible_energy_calibration():
    """Before any step, the prediction is the least-squares calibration on log visible energy:
    electrons and photons on par04-scipb get the resolution such a fit gives (~5%)."""
    options = dict(geometry="par04-scipb", particles=("electron", "photon"), energy_range=(1e3, 1e5))
    datamodule = FinetuneDataModule(task="regression", n_events=300, seed=0, val_fraction=0.0, **options)
    datamodule.setup()
    statistics = datamodule.fit_options()
    assert 0.9 < statistics["visible_energy_slope"][0] <= 1.0  # log E and log E_visible: nearly collinear
    module = FinetuneModule(backbone_config("tiny"), task="regression", **statistics).eval()
    test = Batch.from_data_list(list(datamodule.test_dataset))
    with torch.no_grad():
        predicted = module.predict(test)
    relative = (predicted["prediction"] - predicted["truth"]) / predicted["truth"]
    assert float(relative.std()) < 0.08 and abs(float(relative.mean())) < 0.03
    # a checkpoint from before the calibration path loads with it at zero: the head alone
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("task.calibration.")}
    old = FinetuneModule(backbone_config("tiny"), task="regression", **statistics)
    old.load_state_dict(state)
    assert torch.equal(old.task.calibration.weight, torch.zeros(1, 1)) and torch.equal(old.task.calibration.bias, torch.zeros(1))


def test_segmentation_weights_rare_classes_and_reports_f1(tmp_path):
    events = simulate_pretraining_events("lartpc-768", 16, seed=0)
    result = finetune("segmentation", events, max_steps=3, workdir=tmp_path, **FAST)
    metrics = result.metrics
    assert math.isfinite(metrics["mean_f1"]) and 0 <= metrics["accuracy"] <= 1
    per_class = [value for key, value in metrics.items() if key.startswith("f1/")]
    assert metrics["mean_f1"] == pytest.approx(np.mean(per_class))
    # Inverse-frequency weights over the training points: weight x count is the same for every class seen.
    datamodule = FinetuneDataModule(events, task="segmentation", seed=0, val_fraction=0.0)
    datamodule.setup()
    counts = np.bincount(torch.cat([item.semantic for item in datamodule.train_dataset]).numpy(), minlength=5)
    weights = result.module.task.weights.numpy()
    seen = counts > 0
    assert np.allclose(weights[seen] * counts[seen], counts.sum() / seen.sum())
    assert weights[seen].max() > 2 * weights[seen].min()  # the simulated classes are imbalanced


class RecordHead(L.Callback):
    def on_train_start(self, trainer, module):
        self.head = {key: value.clone() for key, value in module.task.head.state_dict().items()}


def test_linear_probe_on_another_geometry_keeps_the_pretrained_backbone_and_trains_the_head(tmp_path, pretrained):
    """Pretrained on calochallenge-ds2 (SiW), probed on par04-scipb."""
    stored = read_checkpoint(pretrained.checkpoint_path)["state_dict"]
    recorder = RecordHead()
    result = finetune("classification", checkpoint=pretrained.checkpoint_path, mode="linear", n_events=40,
                      geometry="par04-scipb",
                      max_steps=3, workdir=tmp_path, callbacks=[recorder], data_options=SMALL_SHOWERS, **FAST)
    backbone = result.module.backbone.state_dict()
    assert all(torch.equal(backbone[key], stored[f"backbone.{key}"]) for key in backbone)
    scratch = FinetuneModule(backbone_config("tiny")).backbone.state_dict()
    assert not all(torch.equal(scratch[key], backbone[key]) for key in backbone)
    head = result.module.task.head.state_dict()
    assert any(not torch.equal(head[key], recorder.head[key]) for key in head)
    assert json.loads(result.metrics_path.read_text())["checkpoint"] == str(pretrained.checkpoint_path)


def test_a_pretrain_module_is_accepted_as_the_checkpoint(pretrained):
    config, weights = pretrained_backbone(pretrained.module, "base")
    assert config == pretrained.module.backbone.config
    original = pretrained.module.backbone.state_dict()
    assert weights.keys() == original.keys() and all(torch.equal(weights[k], original[k]) for k in weights)


@pytest.mark.parametrize("mode, backbone_lr", [("layerwise", 1e-4), ("full", 1e-3), ("linear", None)])
def test_optimiser_groups_give_the_backbone_its_learning_rate(mode, backbone_lr):
    module = FinetuneModule(backbone_config("tiny"), mode=mode, lr=1e-3, backbone_lr_scale=0.1)
    optimizer = module.configure_optimizers()["optimizer"]
    by_group = {group["name"]: group for group in optimizer.param_groups}
    in_groups = lambda prefix: {id(p) for name, group in by_group.items() if name.startswith(prefix)  # noqa: E731
                                for p in group["params"]}
    assert in_groups("head") == {id(p) for p in module.task.head.parameters()}
    assert all(by_group[name]["initial_lr"] == 1e-3 for name in by_group if name.startswith("head"))
    if backbone_lr is None:
        assert not in_groups("backbone")
        assert not any(p.requires_grad for p in module.backbone.parameters())
    else:
        assert in_groups("backbone") == {id(p) for p in module.backbone.parameters()}
        assert all(by_group[name]["initial_lr"] == pytest.approx(backbone_lr)
                   for name in by_group if name.startswith("backbone"))


def test_n_labels_takes_a_balanced_seeded_subset():
    def train_indices(seed):
        datamodule = FinetuneDataModule(task="classification", n_labels=30, n_events=90, seed=seed,
                                        val_fraction=0.1, **SMALL_SHOWERS)
        datamodule.setup()
        indices = datamodule.train_dataset.indices
        return indices, datamodule.event_classes[indices]

    indices, classes = train_indices(0)
    assert len(indices) == 30 and np.bincount(classes).tolist() == [10, 10, 10]
    assert np.array_equal(indices, train_indices(0)[0])
    assert not np.array_equal(indices, train_indices(1)[0])


def test_a_separate_test_set_is_tested_whole_and_no_training_event_is_held_out():
    data = simulate_pretraining_events(n_events=30, seed=0, **SMALL_SHOWERS)
    test_data = simulate_pretraining_events(n_events=11, seed=5, **SMALL_SHOWERS)
    datamodule = FinetuneDataModule(data, task="classification", test_data=test_data, n_labels=9, val_fraction=0.2)
    datamodule.setup()
    assert datamodule.test_dataset.dataset is test_data and list(datamodule.test_dataset.indices) == list(range(11))
    assert len(datamodule.val_dataset) == 6 and len(datamodule.train_dataset) == 9
    # the balanced subset is drawn with the classes of the training data, not of the test set
    classes = [int(data[int(i)].y) for i in datamodule.train_dataset.indices]
    assert np.bincount(classes).tolist() == [3, 3, 3]
    assert [int(item.y) for item in datamodule.test_dataset] == [int(test_data[i].y) for i in range(11)]


def test_finetune_scores_the_given_test_set_and_retests_a_finished_run_on_another(tmp_path):
    data = simulate_pretraining_events(n_events=24, seed=0, **SMALL_SHOWERS)
    first, second = (simulate_pretraining_events(n_events=n, seed=s, **SMALL_SHOWERS) for n, s in ((10, 5), (7, 6)))
    result = finetune("classification", data=data, test_data=first, max_steps=2, workdir=tmp_path, **FAST)
    assert (result.metrics["n_train"], result.metrics["n_test"]) == (24, 10)
    module = result.module.eval()
    with torch.no_grad():
        predicted = module(Batch.from_data_list([first[i] for i in range(10)])).argmax(1).numpy()
    truth = np.array([int(first[i].y) for i in range(10)])
    assert result.metrics["accuracy"] == pytest.approx(float(np.mean(predicted == truth)))
    assert json.loads(result.metrics_path.read_text())["test_set"] == "test_data"
    again = finetune("classification", data=data, test_data=second, max_steps=2, workdir=tmp_path, **FAST)
    assert again.training["resumed_from_step"] == 2 and again.metrics["n_test"] == 7


def test_a_bad_event_of_the_test_set_is_named_as_such():
    events = [Data(pos=torch.randn(5, 3), x=torch.randn(5, 4), y=torch.tensor([i % 3])) for i in range(6)]
    test_events = [Data(pos=torch.randn(5, 3), x=torch.randn(5, 4), y=torch.tensor([0])) for _ in range(3)]
    del test_events[1].y
    with pytest.raises(DataError, match=r"event 1: has no 'y' label, which classification needs \(in test_data\)"):
        FinetuneDataModule(events, task="classification", test_data=test_events).setup()


def test_balanced_subset_fills_a_short_class_from_the_others():
    classes = np.array([0] * 20 + [1] * 2 + [2] * 20)
    chosen = balanced_subset(np.arange(42) + 100, classes, 12, seed=3)
    assert np.bincount(classes[chosen - 100]).tolist() == [5, 2, 5]


def test_regression_n_labels_is_a_random_subset_of_the_training_part():
    datamodule = FinetuneDataModule(task="regression", n_labels=7, n_events=40, seed=0, val_fraction=0.0,
                                    **SMALL_SHOWERS)
    full = FinetuneDataModule(task="regression", n_events=40, seed=0, val_fraction=0.0, **SMALL_SHOWERS)
    datamodule.setup(), full.setup()
    assert len(datamodule.train_dataset) == 7
    assert set(datamodule.train_dataset.indices) < set(full.train_dataset.indices)
    assert not set(datamodule.train_dataset.indices) & set(datamodule.test_dataset.indices)


def test_classification_data_without_labels_names_the_event():
    events = [Data(pos=torch.randn(5, 3), x=torch.randn(5, 4), y=torch.tensor([0])) for _ in range(3)]
    del events[2].y
    datamodule = FinetuneDataModule(events, task="classification")
    with pytest.raises(DataError, match="event 2: has no 'y' label, which classification needs"):
        datamodule.setup()


def test_segmentation_labels_that_miss_points_name_the_event():
    events = [Data(pos=torch.randn(5, 3), x=torch.randn(5, 4), semantic=torch.zeros(5, dtype=torch.long))
              for _ in range(3)]
    events[1].semantic = torch.zeros(4, dtype=torch.long)
    with pytest.raises(DataError, match="event 1: has 4 'semantic' labels for 5 points"):
        FinetuneDataModule(events, task="segmentation").setup()


def test_regression_leaves_out_events_of_unknown_energy():
    events = [Data(pos=torch.randn(5, 3), x=torch.randn(5, 4), incident_energy=torch.tensor([1e3 * (i + 1)]),
                   theta=torch.tensor([1.5])) for i in range(6)]
    events[4].incident_energy = torch.tensor([float("nan")])
    del events[5].theta  # unknown angle: fine for an energy regression, not for one of theta
    energy = FinetuneDataModule(events, task="regression", val_fraction=0.0, test_fraction=0.2)
    energy.setup()
    assert sorted([*energy.train_dataset.indices, *energy.test_dataset.indices]) == [0, 1, 2, 3, 5]
    angle = FinetuneDataModule(events, task="regression", targets=("theta",), val_fraction=0.0)
    angle.setup()
    assert sorted([*angle.train_dataset.indices, *angle.test_dataset.indices]) == [0, 1, 2, 3, 4]


def test_task_metrics_on_known_predictions():
    truth = np.array([0, 0, 2, 2, 2])
    prediction = np.array([0, 2, 2, 2, 0])
    metrics = task_metrics("classification", prediction, truth)
    # electron: TP 1, FP 1, FN 1 -> 0.5; pion: TP 2, FP 1, FN 1 -> 2/3; photon absent.
    assert metrics == pytest.approx({"accuracy": 0.6, "f1/electron": 0.5, "f1/pion": 2 / 3,
                                     "mean_f1": (0.5 + 2 / 3) / 2})
    energy = np.array([[100.0], [200.0]])
    measured = np.array([[110.0], [190.0]])
    regression = task_metrics("regression", measured, energy)
    assert regression == pytest.approx({"incident_energy/resolution": np.std([0.1, -0.05]),
                                        "incident_energy/bias": 0.025})


def test_regression_cannot_read_its_targets_from_the_conditioning():
    showers = pcfm.sim.simulate_showers("calochallenge-ds2", 4, particle="electron", energy=(2e3, 2e4), seed=5)
    dataset = pcfm.data.ShowerDataset(showers)
    batch = Batch.from_data_list([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    module = FinetuneModule(backbone_config("tiny"), task="regression", targets=("incident_energy", "theta")).eval()
    with torch.no_grad():  # AdaLN starts at zero: make the conditioning act, as after training
        for parameter in module.backbone.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    changed = batch.clone()
    changed.incident_energy, changed.theta = batch.incident_energy * 2.0, batch.theta + 0.3
    with torch.no_grad():
        outputs = module(batch), module(changed)
        # The conditioning does carry the energy: a classifier on the same backbone sees the change.
        classifier = FinetuneModule(backbone_config("tiny"), task="classification").eval()
        classifier.backbone.load_state_dict(module.backbone.state_dict())
        logits = classifier(batch), classifier(changed)
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(logits[0], logits[1])
    assert torch.allclose(module.labels(changed)[:, 0], module.labels(batch)[:, 0] + math.log(2.0))


@pytest.mark.parametrize("task", ["classification", "regression", "segmentation"])
def test_checkpoints_of_pcfm_0_1_load_and_predict_as_they_did(task):
    """Fine-tune checkpoints written before the tasks owned their heads (tests/data/checkpoints_0_1,
    made by its make.py at commit 1fd51bc) load, keep their options, and give the stored outputs."""
    import importlib.util
    import json

    folder = PROJECT_ROOT / "tests" / "data" / "checkpoints_0_1"
    spec = importlib.util.spec_from_file_location("make_checkpoints_0_1", folder / "make.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    stored = torch.load(folder / f"{task}.ckpt", map_location="cpu", weights_only=False)
    assert not any(key.startswith("task.") for key in stored["state_dict"])  # the old layout indeed
    module = FinetuneModule.load_from_checkpoint(folder / f"{task}.ckpt").eval()
    with torch.no_grad():
        outputs = module(maker.events(task))
    expected = torch.tensor(json.loads((folder / "expected.json").read_text())[task])
    torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-6)
    if task == "regression":
        assert module.task.targets == ["incident_energy", "theta"]
        assert torch.equal(module.task.mean, torch.tensor(stored["hyper_parameters"]["target_mean"]))
    else:
        assert torch.equal(module.task.weights, stored["state_dict"]["class_weights"])
