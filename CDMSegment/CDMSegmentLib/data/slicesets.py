"""Compact slice sets in memory and on disk: uint8-quantised slices, labels and where each came from.

Separate from ``data`` so that a GPU machine can train from a ``.npz`` with numpy and
torch alone (no SimpleITK needed there).
"""

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..core.errors import CDMSegmentError


def quantise(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8, step 2/255 (error <= 1/255, below the noise of any MR image)."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8)


def dequantise(q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) / 127.5 - 1.0


class SliceDataset(torch.utils.data.Dataset):
    """Slices held compactly in memory (uint8 quantised, or float16); items are (x (C, S, S) float32, y int64).

    slices: (N, C, S, S) float in [-1, 1], or already uint8 (quantised) / float16.
    case_ids and slice_index (canonical slice number) say where each slice came from; masks
    (N, S, S) bool, the ground truth resized like the slices, only for evaluation and calibration.
    """

    def __init__(self, slices, labels, case_ids: Optional[Sequence[str]] = None, slice_index=None, *,
                 storage: str = "uint8", meta: Optional[dict] = None, masks=None):
        if storage not in ("uint8", "float16"):
            raise CDMSegmentError(f"slice storage must be uint8 or float16, got {storage!r}")
        slices = torch.as_tensor(slices)
        if slices.ndim != 4 or len(slices) != len(labels):
            raise CDMSegmentError(f"expected slices (N, C, S, S) and N labels, got {tuple(slices.shape)} and {len(labels)}")
        if slices.dtype == torch.uint8 or slices.dtype == torch.float16:
            self.data = slices if str(slices.dtype).endswith(storage) else self._store(self._load(slices), storage)
        else:
            self.data = self._store(slices.float(), storage)
        self.storage = storage
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.case_ids = list(case_ids) if case_ids is not None else [""] * len(self.labels)
        self.slice_index = torch.as_tensor(slice_index if slice_index is not None else range(len(self.labels)),
                                           dtype=torch.int32)
        self.meta = dict(meta or {})
        self.masks = torch.as_tensor(masks, dtype=torch.bool) if masks is not None else None

    @staticmethod
    def _store(x: torch.Tensor, storage: str) -> torch.Tensor:
        return quantise(x) if storage == "uint8" else x.clamp(-1, 1).to(torch.float16)

    @staticmethod
    def _load(data: torch.Tensor) -> torch.Tensor:
        return dequantise(data) if data.dtype == torch.uint8 else data.to(torch.float32)

    def as_float(self, index=slice(None)) -> torch.Tensor:
        """Slices ``index`` (any tensor index) as float32 in [-1, 1]."""
        return self._load(self.data[index])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self._load(self.data[i]), self.labels[i]


def save_slices(path, dataset: SliceDataset) -> None:
    """Write a slice set as one compressed ``.npz`` (uint8 slices compress to a few MB per hundred slices)."""
    masks = {} if dataset.masks is None else {"masks": dataset.masks.numpy()}
    np.savez_compressed(Path(path), slices=dataset.data.numpy(), labels=dataset.labels.numpy().astype(np.int16),
                        case_ids=np.array(dataset.case_ids, dtype=np.str_), slice_index=dataset.slice_index.numpy(),
                        storage=np.array(dataset.storage), meta=np.array(json.dumps(dataset.meta)), **masks)


def load_slices(path, *, image_size: Optional[int] = None, modalities: Optional[Sequence[str]] = None,
                with_masks: bool = False, needed_by: str = "the model") -> SliceDataset:
    """Read a slice set written by ``save_slices``.

    image_size, modalities, with_masks: what the caller needs (``needed_by`` names it in the message); a set
    made otherwise raises CDMSegmentError saying how to make the right one, rather than running a network on
    slices of another size.
    """
    path = Path(path)
    if not path.is_file():
        raise CDMSegmentError(f"slice file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = SliceDataset(torch.from_numpy(z["slices"]), torch.from_numpy(z["labels"].astype(np.int64)),
                                [str(c) for c in z["case_ids"]], torch.from_numpy(z["slice_index"]),
                                storage=str(z["storage"]), meta=json.loads(str(z["meta"])),
                                masks=torch.from_numpy(z["masks"]) if "masks" in z else None)
    except (KeyError, ValueError, OSError) as e:
        raise CDMSegmentError(f"{path} is not a slice file written by CDMSegment ({e})")
    if with_masks and data.masks is None:
        raise CDMSegmentError(f"{path} has no masks; make it with 'cdmsegment slices --with-masks'")
    size = int(data.data.shape[-1])
    held = list(data.meta.get("modalities", []))
    if image_size is not None and size != int(image_size):
        raise CDMSegmentError(f"{path} holds {size} px slices but {needed_by} needs {image_size} px; make it with "
                              f"'cdmsegment slices ... --image-size {image_size}'")
    if modalities is not None and held and held != list(modalities):
        raise CDMSegmentError(f"{path} holds {'+'.join(held)} slices but {needed_by} needs "
                              f"{'+'.join(modalities)}; make it with 'cdmsegment slices ... --modalities "
                              f"{','.join(modalities)}'")
    return data
