"""Where a bundle run caches its pre-processed cases: ``dataset_type`` auto / memory / disk chosen from the RAM
estimate, the refusal of an in-memory cache that does not fit, and a disk cache that resumes, never uses a damaged
file and gives the batches the in-memory cache gives."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import BUNDLES
from monai.bundle import ConfigParser
from monai.data import CacheDataset
from monai.utils import set_determinism

from uniseg_monai.core.errors import UsageError
from uniseg_monai.data import cache
from uniseg_monai.data.cache import DiskCacheDataset, bundle_dataset, cache_bytes, load_case
from uniseg_monai.data.memory import GIB


def parser(phantoms, root, **ids) -> ConfigParser:
    p = ConfigParser()
    p.read_config(str(BUNDLES / "uniseg_pretrain" / "configs" / "train.json"))
    p.update({"dataset_dir": str(phantoms.parent), "ckpt_dir": str(root / "models"), "patch_size": [32, 32, 16],
              "num_workers": 0, **ids})  # fmt: skip
    return p


def files(folder) -> list:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_auto_caches_in_memory_when_it_fits_else_on_disk(phantoms, tmp_path, monkeypatch, caplog):
    p = parser(phantoms, tmp_path)
    items, registry = p.get_parsed_content("validate#items"), p.get_parsed_content("registry")
    caplog.set_level(logging.INFO, logger=cache.__name__)
    monkeypatch.setattr(cache, "available_memory", lambda: 64 * GIB)
    in_memory = p.get_parsed_content("validate#dataset", instantiate=True)
    assert isinstance(in_memory, CacheDataset) and not files(tmp_path / "models" / "cache")
    assert "in memory" in caplog.text and "64.0 GiB available" in caplog.text
    monkeypatch.setattr(cache, "available_memory", lambda: 2**20)  # 1 MiB
    on_disk = parser(phantoms, tmp_path).get_parsed_content("validate#dataset")
    assert isinstance(on_disk, DiskCacheDataset) and len(files(tmp_path / "models" / "cache")) == len(items) == 8
    assert "over 50% of the 0.0 GiB available: on disk" in caplog.text
    cached = sum(4 * (on_disk[i]["image"].numel() + on_disk[i]["label"].numel()) for i in range(len(items)))
    assert cache_bytes(items, registry) == pytest.approx(cached, rel=0.05)  # the estimate from the headers


def test_memory_over_the_limit_is_refused_with_the_numbers_and_the_fix(phantoms, tmp_path, monkeypatch):
    p = parser(phantoms, tmp_path)
    args = {"data": p.get_parsed_content("validate#items"), "transform": p.get_parsed_content("validate#preprocessing"),
            "registry": p.get_parsed_content("registry"), "ckpt_dir": tmp_path}  # fmt: skip
    monkeypatch.setattr(cache, "available_memory", lambda: 2**20)
    with pytest.raises(UsageError) as err:
        bundle_dataset(**args, dataset_type="memory")
    message = str(err.value)
    assert "\n" not in message and "caching 8 of 8 cases in memory needs ~0.0" in message
    assert "over 50% of the 0.0 GiB available; use --dataset_type disk (or auto) or a lower --cache_rate" in message
    assert isinstance(bundle_dataset(**args, dataset_type="memory", cache_rate=0), CacheDataset)  # caches nothing
    with pytest.raises(UsageError, match=r"^--dataset_type must be one of auto, memory, disk, got 'ram'$"):
        bundle_dataset(**args, dataset_type="ram")
    with pytest.raises(UsageError, match=r"^--cache_rate must be a number in \[0, 1\], got 2$"):
        bundle_dataset(**args, cache_rate=2)
    (tmp_path / "a_file").write_text("kept")
    with pytest.raises(UsageError, match=r"^--cache_dir .*a_file is a file, not a folder"):
        bundle_dataset(**args, dataset_type="disk", cache_dir=str(tmp_path / "a_file"))
    assert not files(tmp_path / "cache") and (tmp_path / "a_file").read_text() == "kept"


def test_disk_cache_resumes_and_never_uses_a_damaged_file(phantoms, tmp_path, monkeypatch):
    p = parser(phantoms, tmp_path)
    args = {"data": p.get_parsed_content("validate#items"), "transform": p.get_parsed_content("validate#preprocessing"),
            "registry": p.get_parsed_content("registry"), "dataset_type": "disk",
            "cache_dir": str(tmp_path / "c")}  # fmt: skip
    real_save = torch.save

    def full_disk(obj, f):  # a write that stops half-way
        f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        bundle_dataset(**args)
    assert files(tmp_path / "c") == []  # neither a partial file under its name nor a temporary
    monkeypatch.setattr(torch, "save", real_save)
    first = bundle_dataset(**args)
    cached = files(tmp_path / "c")
    assert len(cached) == 8 and all(not f.name.startswith(".") for f in cached)
    before = {f.name: f.stat().st_mtime_ns for f in cached}
    reference = first[0]["image"].as_tensor().clone()  # not memory-mapped: the files are damaged in place below
    cached[0].unlink()  # an interrupted fill
    cached[1].write_bytes(cached[1].read_bytes()[: cached[1].stat().st_size // 2])  # truncated
    cached[2].write_bytes(b"")
    again = DiskCacheDataset(args["data"], args["transform"], tmp_path / "c")
    assert again.fill() == 3
    assert sorted(f.name for f in files(tmp_path / "c")) == sorted(before)
    unchanged = [f.name for f in files(tmp_path / "c") if before[f.name] == f.stat().st_mtime_ns]
    assert len(unchanged) == 5  # the intact files were reused, not rewritten
    # a file damaged after the fill is pre-processed again when drawn, not used
    path = again.cache_file(args["data"][0])
    path.write_bytes(path.read_bytes()[:1000])
    item = again[0]
    assert torch.equal(item["image"].as_tensor(), reference)
    assert torch.equal(load_case(path)["image"].as_tensor(), reference)


@pytest.mark.parametrize("workers", [0, 1])
def test_training_batches_from_the_disk_cache_equal_those_from_memory(phantoms, tmp_path, workers):
    """The bundle's train#dataloader with its augmentation, same seed: the same batches, meta data included."""
    batches = {}
    items = parser(phantoms, tmp_path).get_parsed_content("train#items")[::3]  # 8 cases of the 4 tasks
    for kind in ("memory", "disk"):
        set_determinism(seed=0)
        p = parser(phantoms, tmp_path, dataset_type=kind, num_workers=workers, **{"train#dataset#data": items})
        loader = p.get_parsed_content("train#dataloader")
        assert isinstance(loader.dataset, DiskCacheDataset) == (kind == "disk")
        batches[kind] = [b for _, b in zip(range(3), loader)]
    set_determinism(seed=None)
    for memory, disk in zip(batches["memory"], batches["disk"]):
        assert torch.equal(memory["task_id"], disk["task_id"])
        assert memory["image"].meta["filename_or_obj"] == disk["image"].meta["filename_or_obj"]
        for key in ("image", "label"):
            assert torch.equal(memory[key].as_tensor(), disk[key].as_tensor())
            assert torch.equal(memory[key].affine, disk[key].affine)
