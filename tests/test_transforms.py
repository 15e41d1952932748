"""Task-aware pre-processing and augmentation, on real volumes from ../shared/data/real_samples."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import shared_path
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, SaveImaged
from monai.utils import TraceKeys
from pipelines import BUNDLE, crop_and_augmentation, inference_preprocessing, train_preprocessing

from uniseg_monai.core.errors import InputError
from uniseg_monai.data import load_items
from uniseg_monai.data.phantoms import generate_phantoms
from uniseg_monai.data.transforms import class_ratios, task_file_name
from uniseg_monai.engine.guards import _names
from uniseg_monai.engine.wiring import registry_for_datalist
from uniseg_monai.tasks import TaskRegistry

REGISTRY = TaskRegistry().extended(
    {
        "aorta": {"modalities": ["CT"], "labels": ["background", "aorta"], "spacing": [3.0, 3.0, 3.0]},
        "brats2": {
            "modalities": ["FLAIR", "T1c"],
            "labels": ["background", "edema", "necrosis", "enhancing"],
            "spacing": [2.0, 2.0, 2.0],
            "normalization": ["zscore_nonzero", "zscore_nonzero"],
            "label_map": {"2": 1, "1": 2, "4": 3},
        },
        "tiny_ct": {"modalities": ["CT"], "labels": ["background", "x"], "spacing": [1.0, 1.0, 10.0]},
    }
)
PRE = Compose(train_preprocessing(REGISTRY))


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_lps_ct_is_reoriented_resampled_normalised_and_stays_aligned():
    image = shared_path("data/real_samples/totalseg_examples/ct_thorax_1p5mm.nii.gz")
    label = shared_path("data/real_samples/totalseg_examples/ct_thorax_1p5mm_aorta.nii.gz")
    raw = nib.load(label)
    assert nib.aff2axcodes(raw.affine) == ("L", "P", "S")
    out = PRE({"image": str(image), "label": str(label), "task": "aorta"})
    affine = out["image"].affine.numpy()
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 3.0)
    assert out["image"].shape[1:] == out["label"].shape[1:]
    assert out["image"].shape[1] == pytest.approx(120 * 1.5 / 3, abs=1)
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert set(out["label"].unique().tolist()) == {0.0, 1.0}
    before = world_centroid(raw.get_fdata() > 0, raw.affine)
    after = world_centroid(out["label"][0].numpy() > 0, affine)
    assert np.abs(before - after).max() < 1.5  # under half an output voxel
    fraction_before = (raw.get_fdata() > 0).mean()
    assert out["label"].mean().item() == pytest.approx(fraction_before, rel=0.1)


def test_multi_file_channels_zscore_inside_brain_and_label_map():
    folder = "data/real_samples/tiny_multitask/brats_tumour"
    images = [str(shared_path(f"{folder}/imagesTr/brats_2013_pat0003_1_000{c}.nii.gz")) for c in (0, 1)]
    label = shared_path(f"{folder}/labelsTr/brats_2013_pat0003_1.nii.gz")
    out = PRE({"image": images, "label": str(label), "task": "brats2"})
    img = out["image"]
    assert img.shape[0] == 2
    for c in range(2):
        raw = nib.load(images[c]).get_fdata()
        assert int((img[c] != 0).sum()) == int((raw != 0).sum())  # outside the brain stays 0 (native 2 mm)
        values = img[c][img[c] != 0]
        assert values.mean().item() == pytest.approx(0.0, abs=0.05) and values.std().item() == pytest.approx(
            1, abs=0.05
        )
    raw_label = nib.load(label).get_fdata()
    counts = {v: int((out["label"] == v).sum()) for v in range(4)}
    assert counts[1] == int((raw_label == 2).sum()) and counts[3] == int((raw_label == 4).sum())
    assert counts[2] == int((raw_label == 1).sum())  # raw 3 (non-enhancing) is not in the map: background
    assert set(out["label"].unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_dicom_series_folder_loads_through_itk():
    folder = shared_path("data/real_samples/monai_testing_tiny/CT_DICOM_16x16")
    out = PRE({"image": str(folder), "task": "tiny_ct"})
    assert out["image"].shape[0] == 1 and out["image"].ndim == 4
    assert np.allclose(np.linalg.norm(out["image"].affine.numpy()[:3, :3], axis=0), [1.0, 1.0, 10.0])
    assert 0.0 <= out["image"].min() < out["image"].max() <= 1.0


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_give_the_same_result_as_nifti(tmp_path, suffix):
    datalist = generate_phantoms(tmp_path / "ph")
    nifti = datalist.parent / "abdomen" / "abdomen_001_ct.nii.gz"  # stored LPS
    other = tmp_path / f"ct{suffix}"
    itk.imwrite(itk.imread(str(nifti)), str(other))
    reg = TaskRegistry().extended({"ct": {"modalities": ["CT"], "labels": ["bg", "x"], "spacing": [2.0, 2.0, 4.0]}})
    pre = Compose(inference_preprocessing(reg))
    a, b = pre({"image": str(nifti), "task": "ct"}), pre({"image": str(other), "task": "ct"})
    assert a["image"].shape == b["image"].shape
    assert np.allclose(a["image"].affine.numpy(), b["image"].affine.numpy(), atol=1e-4)
    assert torch.allclose(a["image"].as_tensor(), b["image"].as_tensor(), atol=1e-4)


def test_augmentation_pads_small_volumes_and_keeps_labels_valid():
    torch.manual_seed(0)
    image = torch.rand(2, 20, 30, 10)
    label = torch.zeros(1, 20, 30, 10)
    label[0, 5:9, 5:9, 2:5] = 3
    aug = Compose(crop_and_augmentation(REGISTRY, [32, 32, 16]))
    aug.set_random_state(0)
    for _ in range(10):
        out = aug({"image": image, "label": label, "task": "brats2"})[0]
        assert out["image"].shape == (2, 32, 32, 16) and out["label"].shape == (1, 32, 32, 16)
        assert set(out["label"].unique().tolist()) <= {0.0, 3.0}


def test_foreground_oversampling_rate_and_class_balance():
    label = torch.zeros(1, 100, 100, 40)
    label[0, 10:14, 10:14, 5:8] = 1  # tiny structure: random crops almost never hit it
    crop = Compose(crop_and_augmentation(REGISTRY, [32, 32, 16])[:2])
    crop.set_random_state(1)
    hits = sum(
        bool(crop({"image": label.clone(), "label": label, "task": "aorta"})[0]["label"].any()) for _ in range(400)
    )
    assert 0.25 < hits / 400 < 0.45

    label[0, 50:90, 50:90, 10:35] = 2  # a large class beside the tiny one: the tiny one is still drawn half the time
    label[0, 60:62, 20:22, 30:32] = 3
    tiny = sum(
        bool((crop({"image": label, "label": label, "task": "brats2"})[0]["label"] == 1).any()) for _ in range(400)
    )
    assert 0.06 < tiny / 400 < 0.18  # 0.33 / 3 classes


def test_foreground_rate_stays_the_documented_one_when_classes_are_absent():
    """A 4-class task whose case holds only class 1 (a liver case without tumour): the patch is still centred on
    foreground with probability 0.33, as nnU-Net and the README say (MONAI's class ratios would renormalise to
    0.14); counted over many draws from a tiny structure that a background-centred patch never reaches."""
    label = torch.zeros(1, 100, 100, 40)
    label[0, 10:12, 10:12, 5:7] = 1
    crop = Compose(crop_and_augmentation(REGISTRY, [16, 16, 8])[:2])
    crop.set_random_state(3)
    draws = 1200
    hits = sum(bool(crop({"image": label, "label": label, "task": "brats2"})[0]["label"].any()) for _ in range(draws))
    assert abs(hits / draws - 0.33) < 0.045  # 3.3 standard deviations of a binomial rate at 1,200 draws
    assert class_ratios([True, True, False, False], 0.33) == pytest.approx([0.67, 0.33, 0.0, 0.0])
    assert class_ratios([True, True, False, True], 0.33) == pytest.approx([0.67, 0.165, 0.0, 0.165])
    assert class_ratios([True, False, False], 0.33) == [1.0, 0.0, 0.0]  # no foreground: background
    assert class_ratios([False, True, True], 0.33) == [0.0, 1.0, 1.0]  # no background: foreground only


def test_preprocessing_is_thread_safe_for_one_file_per_channel(phantoms):
    """CacheDataset caches with threads; MONAI's shared LoadImaged would mix up multi-file channels."""
    registry = registry_for_datalist(phantoms)
    items = load_items(phantoms, "training", registry) * 2
    pre = Compose(train_preprocessing(registry)[:2])  # the task, the loader
    with ThreadPoolExecutor(4) as pool:
        channels = list(pool.map(lambda item: (item["task"], pre(dict(item))["image"].shape[0]), items))
    assert all(n == registry[task].in_channels for task, n in channels)


def test_training_data_is_served_without_copies_and_batches_carry_only_what_training_reads(phantoms):
    """``copy_cache`` false (no deep copy of every cached volume per sample) is safe: the crop copies its patch, and
    the paper's augmentation after it leaves the cached arrays, meta data and transform records as they were. The
    batches carry the file names (for error messages) and affines only: 5 tensors for a worker to send, not 92."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"dataset_dir": str(phantoms.parent), "patch_size": [32, 32, 16], "task": "ph_organs"})
    parser.update({"num_workers": 0, "batch_size": 2})
    dataset = parser.get_parsed_content("train#dataset")
    assert dataset.copy_cache is False
    before = copy.deepcopy(dataset._cache)
    for _ in range(3):
        samples = [dataset[i][0] for i in range(len(dataset))]
    assert all(s["image"].untyped_storage().data_ptr() != c["image"].untyped_storage().data_ptr()
               for s, c in zip(samples, dataset._cache))  # fmt: skip
    for old, new in zip(before, dataset._cache):
        for key in ("image", "label"):
            assert torch.equal(old[key], new[key]) and old[key].meta.keys() == new[key].meta.keys()
            assert old[key].applied_operations == new[key].applied_operations
        assert all(torch.equal(a, b) for a, b in zip(old["class_indices"], new["class_indices"]))
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    for key in ("image", "label"):
        assert {str(k) for k in batch[key].meta} <= {"affine", "filename_or_obj", "space"}  # space: MetaTensor's own
        assert batch[key].applied_operations == [TraceKeys.NONE] * 2  # collated empty records
    assert "files " + ", ".join(batch["image"].meta["filename_or_obj"]) in _names(batch)


def test_saved_predictions_are_named_case_task_with_their_dots_and_stay_in_the_output_folder(tmp_path):
    saver = SaveImaged("pred", output_dir=tmp_path / "predictions", output_postfix="seg", separate_folder=False,
                       output_name_formatter=task_file_name)  # fmt: skip
    for case, task in (("c.001", "v1.2"), ("c.001", "v1.3"), ("c", "001_v1.2")):  # MONAI alone cuts at the last dot
        saver({"pred": MetaTensor(torch.zeros(1, 2, 2, 2), meta={"case": case, "task": task})})
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == [
        "c.001_v1.2_seg.nii.gz", "c.001_v1.3_seg.nii.gz", "c_001_v1.2_seg.nii.gz"
    ]  # fmt: skip
    for case in ("../x", "a/b", "/tmp/x"):  # a datalist's "case": MONAI would keep only its last part
        with pytest.raises(InputError, match="not a file in the output folder"):
            saver({"pred": MetaTensor(torch.zeros(1, 2, 2, 2), meta={"case": case, "task": "t"})})
    assert len(list((tmp_path / "predictions").iterdir())) == 3 and sorted(tmp_path.iterdir()) == [
        tmp_path / "predictions"
    ]
