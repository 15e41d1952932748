"""Deterministic synthetic multi-task data: the embedded default data of the demo and the tests.

Four tasks, written as NIfTI with realistic spacings and affines (some cases stored LPS, native spacings
jittered around the task spacing so resampling is exercised):

- ``ph_organs`` (CT, id 0): liver and spleen in an abdomen with fat, muscle and a bright spine.
- ``ph_liver`` (CT, id 1): liver and liver tumour **of the same CT volumes** (as MSD Liver beside an organ
  data set): label 2 is "spleen" under ``ph_organs`` and "liver tumour" under ``ph_liver``, and a tumour voxel
  is "liver" under ``ph_organs``, so only the task prompt tells the network which map to draw.
- ``ph_brain`` (4-channel MR, id 2): BraTS-like tumour (edema, necrotic core, enhancing rim) in raw BraTS
  label values 1/2/4, mapped by the task's ``label_map``; one file per channel.
- ``ph_petct`` (CT + PET, id 3): hot lesions in PET among physiological uptake (kidneys, bladder).

:func:`generate_downstream_phantoms` writes fine-tuning data in the layouts of the public releases that
``uniseg prepare`` reads: BTCV-like CT with the 13 BTCV organs (Synapse ``RawData/Training/img|label``) and
VS-like contrast T1 MR with one tumour (``vs_gk_<n>/vs_gk_t1_refT1.nii.gz`` + ``vs_gk_seg_refT1.nii.gz``);
:data:`DOWNSTREAM_TASKS` defines the demo's fine-tuning task on them (``ph_kidneys``: three BTCV organs).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

TASKS = {
    "ph_organs": {
        "id": 0,
        "modalities": ["CT"],
        "labels": ["background", "liver", "spleen"],
        "spacing": [3.0, 3.0, 4.0],
        "normalization": ["ct"],
    },
    "ph_liver": {
        "id": 1,
        "modalities": ["CT"],
        "labels": ["background", "liver", "liver tumour"],
        "spacing": [3.0, 3.0, 4.0],
        "normalization": ["ct"],
    },
    "ph_brain": {
        "id": 2,
        "modalities": ["T1", "T1ce", "T2", "FLAIR"],
        "labels": ["background", "edema", "necrotic core", "enhancing tumour"],
        "spacing": [2.0, 2.0, 2.0],
        "normalization": ["zscore_nonzero"] * 4,
        "label_map": {"2": 1, "1": 2, "4": 3},
    },
    "ph_petct": {
        "id": 3,
        "modalities": ["CT", "PET"],
        "labels": ["background", "lesion"],
        "spacing": [3.0, 3.0, 6.0],
        "normalization": ["ct", "zscore"],
    },
}
# the demo's unseen downstream task: three organs of the BTCV-like phantoms (a label_map selects them)
DOWNSTREAM_TASKS = {
    "ph_kidneys": {
        "modalities": ["CT"],
        "labels": ["background", "right kidney", "left kidney", "gallbladder"],
        "short_labels": ["bg", "RKi", "LKi", "Gb"],
        "normalization": ["ct"],
        "label_map": {"2": 1, "3": 2, "4": 3},
    }
}
SPLITS = {"training": 6, "validation": 2, "testing": 2}
FOV_MM = {
    "abdomen": (192.0, 192.0, 160.0),
    "head": (128.0, 128.0, 96.0),
    "body": (192.0, 192.0, 192.0),
    "posterior_fossa": (48.0, 48.0, 36.0),
}
# BTCV organs in label order: centre (x, y, z) and radii in mm (RAS: +x = patient left), CT value in HU
BTCV_ORGANS = (
    ("spleen", (50, -10, 0), (18, 22, 30), 180),
    ("right kidney", (-38, -30, -10), (13, 15, 25), 230),
    ("left kidney", (38, -30, -10), (13, 15, 25), 230),
    ("gallbladder", (-22, 30, -20), (10, 10, 14), -10),
    ("esophagus", (6, -22, 45), (7, 7, 30), 60),
    ("liver", (-42, 5, 12), (30, 34, 42), 130),
    ("stomach", (22, 25, 18), (20, 16, 22), -60),
    ("aorta", (10, -38, 0), (8, 8, 70), 320),
    ("inferior vena cava", (-14, -34, 0), (8, 8, 70), 260),
    ("portal and splenic vein", (5, 0, 0), (28, 6, 6), 280),
    ("pancreas", (12, 12, -22), (26, 9, 9), 90),
    ("right adrenal gland", (-26, -42, 28), (7, 7, 9), 160),
    ("left adrenal gland", (26, -42, 28), (7, 7, 9), 160),
)


def _grid(shape: tuple[int, ...], spacing: np.ndarray) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm, centred on the volume."""
    return [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]


def _ellipsoid(coords: list[np.ndarray], centre, radii) -> np.ndarray:
    x, y, z = coords
    return (
        ((x[:, None, None] - centre[0]) / radii[0]) ** 2
        + ((y[None, :, None] - centre[1]) / radii[1]) ** 2
        + ((z[None, None, :] - centre[2]) / radii[2]) ** 2
    ) <= 1


def _volume(rng: np.random.Generator, fov: str, spacing: list[float]) -> tuple[tuple[int, ...], np.ndarray]:
    native = np.array(spacing) * rng.uniform(0.85, 1.15, 3)
    shape = tuple(round(f / s) for f, s in zip(FOV_MM[fov], native))
    return shape, native


def _affine(native: np.ndarray, shape: tuple[int, ...], lps: bool) -> np.ndarray:
    affine = np.diag([*native, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * native
    if lps:  # same anatomy, stored with flipped x and y axes
        affine[0, 0] *= -1
        affine[1, 1] *= -1
        affine[:2, 3] *= -1
    return affine


def _save(array: np.ndarray, affine: np.ndarray, lps: bool, path: Path, dtype) -> None:
    data = array[::-1, ::-1] if lps else array
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data).astype(dtype), affine), path)


def _abdomen(rng: np.random.Generator, shape, native):
    c = _grid(shape, native)
    body = _ellipsoid(c, (0, 0, 0), (85, 70, 200))
    ct = np.full(shape, -1000.0)
    ct[body] = -100.0  # fat
    ct[_ellipsoid(c, (0, 0, 0), (75, 60, 200))] = 40.0  # muscle / soft tissue
    ct[_ellipsoid(c, (0, -45, 0), (12, 12, 200))] = 450.0  # spine
    liver_c = (rng.uniform(-40, -30), rng.uniform(-5, 10), rng.uniform(-10, 10))
    liver_r = (rng.uniform(28, 34), rng.uniform(30, 38), rng.uniform(45, 60))
    liver = _ellipsoid(c, liver_c, liver_r)
    # the spleen close enough to the liver that crops of the liver task show it (as background)
    spleen = _ellipsoid(c, (rng.uniform(26, 30), rng.uniform(-15, 0), rng.uniform(-5, 15)), (20, 24, 34))
    ct[liver] = 130.0  # contrast-enhanced, brighter than real livers so a tiny CPU model learns it in minutes
    ct[spleen] = 220.0
    tumour = np.zeros(shape, bool)
    for _ in range(rng.integers(1, 3)):
        offset = rng.uniform(-0.4, 0.4, 3) * np.array(liver_r)
        tumour |= _ellipsoid(c, np.array(liver_c) + offset, [rng.uniform(14, 19)] * 3)
    tumour &= liver
    ct[tumour] = 30.0  # hypodense lesion
    ct += rng.normal(0, 10, shape)
    organs = np.where(liver, 1, 0) + np.where(spleen & ~liver, 2, 0)
    return ct, organs, np.where(liver, 1, 0) + tumour


def _brain(rng: np.random.Generator, shape, native):
    c = _grid(shape, native)
    head = _ellipsoid(c, (0, 0, 0), (55, 60, 42))
    brain = _ellipsoid(c, (0, 0, 0), (48, 54, 36))
    centre = np.array([rng.uniform(-20, 20), rng.uniform(-20, 20), rng.uniform(-8, 8)])
    r = rng.uniform(16, 20)
    edema = _ellipsoid(c, centre, (r * 1.8, r * 1.7, r * 1.5)) & brain
    enhancing = _ellipsoid(c, centre, (r, r, r))
    necrotic = _ellipsoid(c, centre, (r * 0.6,) * 3)
    raw = np.where(edema, 2, 0)
    raw[enhancing] = 4
    raw[necrotic] = 1
    # tissue intensities per channel: (scalp, brain, edema, enhancing, necrotic) for T1, T1ce, T2, FLAIR
    table = {
        "T1": (300, 500, 380, 420, 250),
        "T1ce": (300, 500, 400, 1000, 200),
        "T2": (200, 400, 800, 600, 900),
        "FLAIR": (250, 400, 900, 650, 300),
    }
    channels = []
    for scalp, tissue, ed, en, ne in table.values():
        img = np.zeros(shape)
        img[head] = scalp
        img[brain] = tissue
        img[edema] = ed
        img[enhancing] = en
        img[necrotic] = ne
        img[head] += rng.normal(0, 25, int(head.sum()))
        channels.append(img)
    return channels, raw.astype(np.uint8)


def _petct(rng: np.random.Generator, shape, native):
    c = _grid(shape, native)
    body = _ellipsoid(c, (0, 0, 0), (85, 70, 300))
    ct = np.full(shape, -1000.0)
    ct[body] = 30.0
    ct[_ellipsoid(c, (0, -45, 0), (12, 12, 300))] = 450.0
    pet = np.zeros(shape)
    pet[body] = 1.0
    for side in (-1, 1):  # kidneys: elongated physiological uptake
        pet[_ellipsoid(c, (side * 35, -20, 20), (10, 12, 25))] = 3.0
    pet[_ellipsoid(c, (0, 20, -70), (20, 18, 15))] = 5.0  # bladder (kept below the lesions' uptake)
    lesions = np.zeros(shape, bool)
    for _ in range(rng.integers(2, 4)):
        centre = (rng.uniform(-50, 50), rng.uniform(-30, 40), rng.uniform(-40, 60))
        lesions |= _ellipsoid(c, centre, [rng.uniform(15, 20)] * 3)
    lesions &= body
    pet[lesions] = rng.uniform(8, 12)
    pet = np.clip(pet + rng.normal(0, 0.3, shape), 0, None)
    ct += rng.normal(0, 12, shape)
    return ct, pet, lesions.astype(np.uint8)


def _btcv_like(rng: np.random.Generator, shape, native):
    """Abdominal CT (HU) and its 13-organ label map (BTCV order); organs jittered in place and size."""
    c = _grid(shape, native)
    ct = np.full(shape, -1000.0)
    ct[_ellipsoid(c, (0, 0, 0), (85, 70, 200))] = -100.0
    ct[_ellipsoid(c, (0, 0, 0), (75, 60, 200))] = 40.0
    label = np.zeros(shape, np.uint8)
    for k, (_, centre, radii, hu) in enumerate(BTCV_ORGANS, start=1):
        mask = _ellipsoid(c, np.add(centre, rng.uniform(-4, 4, 3)), np.multiply(radii, rng.uniform(0.9, 1.1, 3)))
        ct[mask] = hu
        label[mask] = k
    return ct + rng.normal(0, 10, shape), label


def _vs_like(rng: np.random.Generator, shape, native):
    """Contrast T1 MR of the posterior fossa with one enhancing vestibular schwannoma, and its mask."""
    c = _grid(shape, native)
    mr = np.full(shape, 500.0)
    mr[_ellipsoid(c, (0, -6, 0), (7, 7, 40))] = 200.0  # fourth ventricle / CSF
    side = rng.choice([-1, 1])
    tumour = _ellipsoid(
        c, (side * rng.uniform(10, 14), rng.uniform(-4, 4), rng.uniform(-4, 4)), [rng.uniform(4, 7)] * 3
    )
    mr[_ellipsoid(c, (0, 12, 0), (2.5, 2.5, 40))] = 1000.0  # enhancing vessel (not a tumour)
    mr[tumour] = 1100.0
    return np.clip(mr + rng.normal(0, 30, shape), 0, None), tumour.astype(np.uint8)


def generate_downstream_phantoms(out: str | Path, kind: str, cases: int = 10, seed: int = 0, spacing=None) -> Path:
    """Write ``cases`` BTCV-like (``kind="btcv"``) or VS-like (``kind="vs"``) phantoms in the public release's
    layout under ``out`` (the folder ``uniseg prepare --format KIND`` reads); returns ``out``.

    ``spacing`` (x, y, z) in mm defaults to the built-in task's (BTCV 1.5x1.5x3, VS 0.5x0.5x1.5), jittered.
    """
    from uniseg_monai.tasks import BUILTIN_TASKS

    if kind not in ("btcv", "vs"):
        raise ValueError(f"kind must be 'btcv' or 'vs', got {kind!r}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    for case in range(1, cases + 1):
        lps = case % 2 == 0
        fov = "abdomen" if kind == "btcv" else "posterior_fossa"
        shape, native = _volume(rng, fov, spacing or BUILTIN_TASKS[kind]["spacing"])
        affine = _affine(native, shape, lps)
        if kind == "btcv":
            image, label = _btcv_like(rng, shape, native)
            folder = out / "Training"
            (folder / "img").mkdir(parents=True, exist_ok=True)
            (folder / "label").mkdir(parents=True, exist_ok=True)
            _save(image, affine, lps, folder / "img" / f"img{case:04d}.nii.gz", np.int16)
            _save(label, affine, lps, folder / "label" / f"label{case:04d}.nii.gz", np.uint8)
        else:
            image, label = _vs_like(rng, shape, native)
            folder = out / f"vs_gk_{case}"
            folder.mkdir(parents=True, exist_ok=True)
            _save(image, affine, lps, folder / "vs_gk_t1_refT1.nii.gz", np.float32)
            _save(label, affine, lps, folder / "vs_gk_seg_refT1.nii.gz", np.uint8)
    return out


def generate_phantoms(out: str | Path, seed: int = 0) -> Path:
    """Write the phantom data set and ``datalist.json`` under ``out``; returns the datalist path.

    Deterministic for a given seed. Refuses to write into a non-empty folder that holds other files.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "datalist.json").exists():
        raise FileExistsError(f"{out} is not empty and holds no phantom datalist; choose an empty folder")
    rng = np.random.default_rng(seed)
    datalist: dict = {"tasks": TASKS, "training": [], "validation": [], "testing": []}
    for kind in ("abdomen", "brain", "petct"):
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        case = 0
        for section, count in SPLITS.items():
            for _ in range(count):
                name = f"{kind}_{case:03d}"
                lps = case % 2 == 1
                case += 1
                if kind == "abdomen":
                    shape, native = _volume(rng, "abdomen", TASKS["ph_organs"]["spacing"])
                    affine = _affine(native, shape, lps)
                    ct, organs, liver = _abdomen(rng, shape, native)
                    _save(ct, affine, lps, folder / f"{name}_ct.nii.gz", np.int16)
                    _save(organs, affine, lps, folder / f"{name}_organs.nii.gz", np.uint8)
                    _save(liver, affine, lps, folder / f"{name}_liver.nii.gz", np.uint8)
                    for task, lab in (("ph_organs", "organs"), ("ph_liver", "liver")):
                        item = {"image": f"{kind}/{name}_ct.nii.gz", "task": task}
                        datalist[section].append({**item, "label": f"{kind}/{name}_{lab}.nii.gz"})
                elif kind == "brain":
                    shape, native = _volume(rng, "head", TASKS["ph_brain"]["spacing"])
                    affine = _affine(native, shape, lps)
                    channels, raw = _brain(rng, shape, native)
                    images = []
                    for modality, img in zip(TASKS["ph_brain"]["modalities"], channels):
                        _save(img, affine, lps, folder / f"{name}_{modality.lower()}.nii.gz", np.float32)
                        images.append(f"{kind}/{name}_{modality.lower()}.nii.gz")
                    _save(raw, affine, lps, folder / f"{name}_seg.nii.gz", np.uint8)
                    item = {"image": images, "label": f"{kind}/{name}_seg.nii.gz", "task": "ph_brain"}
                    datalist[section].append(item)
                else:
                    shape, native = _volume(rng, "body", TASKS["ph_petct"]["spacing"])
                    affine = _affine(native, shape, lps)
                    ct, pet, lesions = _petct(rng, shape, native)
                    _save(ct, affine, lps, folder / f"{name}_ct.nii.gz", np.int16)
                    _save(pet, affine, lps, folder / f"{name}_pet.nii.gz", np.float32)
                    _save(lesions, affine, lps, folder / f"{name}_lesions.nii.gz", np.uint8)
                    images = [f"{kind}/{name}_ct.nii.gz", f"{kind}/{name}_pet.nii.gz"]
                    item = {"image": images, "label": f"{kind}/{name}_lesions.nii.gz", "task": "ph_petct"}
                    datalist[section].append(item)
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path
