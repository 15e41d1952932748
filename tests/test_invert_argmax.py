"""``InvertArgmaxd`` (the bundles' inference post-processing) gives MONAI's softmax -> ``Invertd`` -> argmax labels
in bounded memory: stored LPS, oblique, finer and coarser than the task spacing, or already at it; ties go to the
first class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Activationsd, AsDiscreted, Compose, EnsureTyped, Invertd, Orientationd, Spacingd

from uniseg_monai.data.transforms import InvertArgmaxd


def oblique(angle: float, zooms: tuple[float, float, float]) -> np.ndarray:
    """An affine rotated by ``angle`` about z, with ``zooms`` (a negative zoom flips that axis)."""
    c, s = np.cos(angle), np.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(zooms)
    affine[:3, 3] = [10, -5, 30]
    return affine


RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # as inference.json
GEOMETRIES = {  # input shape, affine, task spacing
    "lps_finer": ((90, 70, 50), oblique(0, (-0.8, -0.8, 1.0)), (1.5, 1.5, 3.0)),
    "oblique_coarser_z": ((60, 50, 12), oblique(0.3, (-0.8, 0.9, 2.5)), (1.5, 1.5, 1.5)),
    "at_task_spacing": ((40, 30, 20), oblique(0, (1.5, 1.5, 3.0)), (1.5, 1.5, 3.0)),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_equals_softmax_invertd_argmax(geometry):
    shape, affine, spacing = GEOMETRIES[geometry]
    steps = [Orientationd("image", "RAS", labels=RAS_LABELS), Spacingd("image", spacing, mode="bilinear")]
    preprocessing = Compose([*steps, EnsureTyped("image", dtype=torch.float32)])
    image = MetaTensor(torch.rand(1, *shape), affine=torch.as_tensor(affine), meta={"filename_or_obj": "ct.nii.gz"})
    item = preprocessing({"image": image})
    size = item["image"].shape[1:]
    torch.manual_seed(0)
    coarse = torch.randn(1, 4, *(max(2, n // 5) for n in size)) * 4
    logits = F.interpolate(coarse, size=list(size), mode="trilinear")[0]  # (4, X', Y', Z'): smooth, many borders
    logits[2] = logits[1]  # classes 1 and 2 tie everywhere: class 1 must win

    reference = Compose([
        Activationsd("pred", softmax=True),
        Invertd("pred", preprocessing, orig_keys="image", nearest_interp=False),
        AsDiscreted("pred", argmax=True),
    ])({"image": item["image"], "pred": MetaTensor(logits.clone())})["pred"]  # fmt: skip
    labels = InvertArgmaxd("pred", preprocessing, block=2**14)({"image": item["image"], "pred": logits})["pred"]

    assert labels.dtype == torch.uint8 and labels.shape == reference.shape == (1, *shape)
    np.testing.assert_allclose(labels.affine, affine, atol=1e-6)
    np.testing.assert_allclose(labels.affine, reference.affine, atol=1e-6)
    assert labels.meta["filename_or_obj"] == reference.meta["filename_or_obj"] == "ct.nii.gz"
    assert set(torch.unique(labels).tolist()) == {0, 1, 3}  # the tie went to class 1
    differing = int((labels != reference.to(torch.uint8)).sum())
    assert differing <= 1e-4 * labels.numel(), f"{differing} of {labels.numel()} voxels differ"


def test_refuses_what_it_cannot_undo():
    image = MetaTensor(torch.rand(1, 20, 20, 10), affine=torch.eye(4))
    nearest = Compose([Spacingd("image", (2.0, 2.0, 2.0), mode="nearest")])
    item = nearest({"image": image})
    with pytest.raises(ValueError, match="undoes a last bilinear resampling with border padding"):
        InvertArgmaxd("pred", nearest)({"image": item["image"], "pred": torch.rand(2, *item["image"].shape[1:])})
