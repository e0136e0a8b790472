"""A file format is a reader with an opener function plus one line in pcfm.data.FORMATS: a format
defined here (one HDF5 dataset of points per event) is detected and opened by open_dataset."""
import h5py
import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from pcfm.data import open_dataset
from pcfm.data.formats import FORMATS, FileFormat, detect_format


class ToyPoints(torch.utils.data.Dataset):
    """Every event of a toy file: rows (x, y, z, E) under key ``toy_points/<i>``."""

    def __init__(self, paths, transform=None):
        self.items = []
        for path in paths:
            with h5py.File(path, "r") as file:
                for key in sorted(file["toy_points"], key=int):
                    rows = torch.as_tensor(file["toy_points"][key][()], dtype=torch.float32)
                    self.items.append(Data(pos=rows[:, :3], x=torch.log(rows[:, 3:4])))
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        return item if self.transform is None else self.transform(item)


def open_toy(paths, geometry, transform, **options):
    return ToyPoints(paths, transform, **options)


def test_a_registered_format_is_detected_and_opened(tmp_path, monkeypatch):
    path = tmp_path / "toy.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as file:
        for i in range(3):
            file.create_dataset(f"toy_points/{i}", data=rng.random((5 + i, 4)) + 0.1)
    with pytest.raises(Exception, match="unknown file format"):
        detect_format(path)
    monkeypatch.setitem(FORMATS, "toy", FileFormat(("toy_points",), "tests.data.test_formats_registry:open_toy"))
    assert detect_format(path) == "toy"
    dataset = open_dataset(str(path))
    assert isinstance(dataset, ToyPoints) and [dataset[i].num_nodes for i in range(3)] == [5, 6, 7]
    with pytest.raises(ValueError, match="unknown format 'nope'; choose auto, calochallenge, pilarnet, caloclouds, toy"):
        open_dataset(str(path), format="nope")
