"""Reading, writing and converting detector data.

- containers: :class:`CaloShowers` (voxelised showers), :class:`LArEvent` (PILArNet-M events);
- formats: CaloChallenge (:func:`read_calochallenge`, :func:`write_calochallenge`), PILArNet-M
  (:func:`read_pilarnet_event`, :func:`write_pilarnet`), CaloClouds (:func:`read_caloclouds`);
- point clouds: :func:`shower_to_data`, :func:`lartpc_to_data`, :func:`cloud_to_data`,
  :func:`data_to_showers` (back to cells);
- datasets: lazy, per-worker HDF5 access (:func:`open_dataset` for any format), and
  :class:`PointBudgetBatchSampler` to fill batches by a point budget.
"""
from pcfm.data.calochallenge import CaloChallengeFile, read_calochallenge, write_calochallenge
from pcfm.data.caloclouds import CaloCloudEvent, CaloCloudsDataset, read_caloclouds
from pcfm.data.datasets import CaloChallengeDataset, EventList, LArTPCDataset, ShowerDataset
from pcfm.data.events import (ELECTRON, PARTICLE_CLASSES, PARTICLE_NAMES, PHOTON, PION, SEMANTIC_CLASSES,
                              CaloShowers, LArEvent)
from pcfm.data.formats import detect_format, open_dataset
from pcfm.data.pilarnet import PILArNetDataset, read_pilarnet_event, write_pilarnet
from pcfm.data.pointcloud import (POINT_FEATURES, cloud_to_data, data_to_showers, lartpc_to_data,
                                  shower_to_data)
from pcfm.data.sampler import PointBudgetBatchSampler

__all__ = [
    "CaloShowers", "LArEvent", "ELECTRON", "PHOTON", "PION", "PARTICLE_CLASSES", "PARTICLE_NAMES",
    "SEMANTIC_CLASSES", "read_calochallenge", "write_calochallenge", "CaloChallengeFile",
    "read_pilarnet_event", "write_pilarnet", "PILArNetDataset", "read_caloclouds", "CaloCloudEvent",
    "CaloCloudsDataset", "shower_to_data", "lartpc_to_data", "cloud_to_data", "data_to_showers",
    "POINT_FEATURES", "ShowerDataset", "EventList", "CaloChallengeDataset", "LArTPCDataset", "open_dataset",
    "detect_format", "PointBudgetBatchSampler",
]
