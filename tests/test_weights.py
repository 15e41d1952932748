"""Pretrained weights through each bundle's large_files.yml: `python -m monai.bundle download_large_files` fetches
models/model.pt from its url and checks its sha256; a mismatch is an error and leaves no model.pt behind."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


@pytest.mark.parametrize("name", ["uniseg_pretrain", "uniseg_finetune_btcv", "uniseg_finetune_vs"])
def test_large_files_describe_the_model(name):
    entries = yaml.safe_load((BUNDLES / name / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in entries] == ["models/model.pt"] and entries[0]["hash_type"] == "sha256"


@pytest.mark.parametrize("right_hash", [True, False])
def test_download_checks_the_hash(tmp_path, right_hash):
    remote = tmp_path / "remote" / "model.pt"
    remote.parent.mkdir()
    remote.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(remote.read_bytes()).hexdigest()
    bundle = shutil.copytree(BUNDLES / "uniseg_finetune_vs", tmp_path / "bundle")
    entry = {"path": "models/model.pt", "url": remote.as_uri(), "hash_type": "sha256"}
    entry["hash_val"] = digest if right_hash else "0" * 64
    (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(bundle)],
        capture_output=True,
        text=True,
    )
    target = bundle / "models" / "model.pt"
    if right_hash:
        assert run.returncode == 0, run.stderr[-2000:]
        assert target.read_bytes() == remote.read_bytes()
    else:
        assert run.returncode != 0 and "hash check" in run.stderr
        assert not target.exists()
