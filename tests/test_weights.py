"""Pretrained weights into a bundle: each bundle's large_files.yml (the official release), MONAI's
``download_large_files``, and ``uniseg weights`` (download, check, convert, provenance, no silent overwrite)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import shutil
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BUNDLES, tiny_bundle
from monai.bundle import ConfigParser
from nnunet_v1 import nnunet_v1_container, save_nnunet_v1

from uniseg_monai.apps.weights import download_weights, fetch
from uniseg_monai.cli import main
from uniseg_monai.engine.checkpoints import description
from uniseg_monai.model_io.model_files import ModelFileError, ModelLoader, read_model
from uniseg_monai.model_io.official import convert_state_dict
from uniseg_monai.model_io.transfer import bundle_pretrained

OFFICIAL_URL = "https://drive.google.com/uc?id=1Ldgd5Ebc8VQrvGIpIgzUG2PTSDPUpEQJ"
TARGETS = {"uniseg_pretrain": "models/model.pt", "uniseg_finetune_btcv": "models/pretrained.pt"}
TARGETS["uniseg_finetune_vs"] = "models/pretrained.pt"


def uniseg(*args: str) -> subprocess.CompletedProcess:
    """``uniseg ARGS`` in this process (the CLI's ``main``): exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as done:
        main(list(args))
        sys.exit(0)
    return subprocess.CompletedProcess(args, done.value.code or 0, out.getvalue(), err.getvalue())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture()
def official_file(official_fixture, tmp_path) -> Path:
    """The tiny official upstream model in the release's container (numpy 1.x pickle)."""
    return save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), tmp_path / "official.model")


@pytest.mark.parametrize("name", list(TARGETS))
def test_large_files_name_the_official_release(name):
    text = (BUNDLES / name / "large_files.yml").read_text()
    entries = yaml.safe_load(text)["large_files"]
    assert entries == [{"path": TARGETS[name], "url": OFFICIAL_URL, "hash_val": "", "hash_type": "sha256"}]
    assert "--bundle_path" in text and "--bundle_root" not in text and "non-commercial" in text


@pytest.mark.integration
@pytest.mark.parametrize("name", list(TARGETS))
def test_monai_download_large_files_works_on_every_bundle(official_fixture, official_file, tmp_path, name):
    """MONAI's own command fetches the listed file (here from file://, as offline machines do); the raw official
    container it leaves is then what the bundle loads (model.pt) or transfers from (pretrained.pt)."""
    kind = "upstream" if name == "uniseg_pretrain" else "downstream"
    bundle = tiny_bundle(official_fixture, kind, name, tmp_path)
    entries = yaml.safe_load((bundle / "large_files.yml").read_text())
    entries["large_files"][0]["url"] = official_file.as_uri()
    (bundle / "large_files.yml").write_text(yaml.safe_dump(entries))
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(bundle)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    target = bundle / TARGETS[name]
    assert target.read_bytes() == official_file.read_bytes()
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.update({"bundle_root": str(bundle)})
    network = parser.get_parsed_content("network_def")
    if name == "uniseg_pretrain":
        ModelLoader(target, network)()  # strict: every tensor
        expected = convert_state_dict(official_fixture["upstream_state_dict"])
        assert all(torch.equal(network.state_dict()[k], v) for k, v in expected.items())
    else:
        assert bundle_pretrained(bundle) == str(target)


@pytest.mark.integration
@pytest.mark.parametrize("right_hash", [True, False])
def test_download_checks_the_hash(tmp_path, right_hash):
    remote = tmp_path / "remote" / "model.pt"
    remote.parent.mkdir()
    remote.write_bytes(b"weights" * 1000)
    bundle = shutil.copytree(BUNDLES / "uniseg_finetune_vs", tmp_path / "bundle")
    entry = {"path": "models/model.pt", "url": remote.as_uri(), "hash_type": "sha256"}
    entry["hash_val"] = sha256(remote) if right_hash else "0" * 64
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


def test_weights_installs_a_checked_converted_model_with_provenance(official_fixture, official_file, tmp_path):
    bundle = tiny_bundle(official_fixture, "upstream", "uniseg_pretrain", tmp_path)
    run = uniseg("weights", "--bundle", str(bundle), "--url", official_file.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    assert "licence of these weights" in run.stderr and "non-commercial" in run.stderr
    assert f"not verified (no published hash to check); its sha256 is {sha256(official_file)}" in run.stderr
    model_pt = bundle / "models" / "model.pt"
    saved = torch.load(model_pt, weights_only=True)  # plain weights: no numpy, no training state
    assert set(saved) == {"model", "network_def", "tasks", "provenance"}
    assert saved["network_def"]["num_tasks"] == 11 and len(saved["tasks"]) == 11
    expected = convert_state_dict(official_fixture["upstream_state_dict"])
    assert saved["model"].keys() == expected.keys() and all(
        torch.equal(saved["model"][k], expected[k]) for k in expected
    )
    provenance = json.loads((bundle / "models" / "model_provenance.json").read_text())
    assert provenance["source"] == official_file.as_uri() and provenance["source_sha256"] == sha256(official_file)
    assert provenance["model_sha256"] == sha256(model_pt) and "non-commercial" in provenance["licence"]
    assert not [p for p in (bundle / "models").iterdir() if p.name.startswith(".")]  # no temporary download left

    before = model_pt.read_bytes()
    again = uniseg("weights", "--bundle", str(bundle), "--url", str(official_file))  # a plain path works too
    assert again.returncode == 2 and "--overwrite" in again.stderr and str(model_pt) in again.stderr
    assert model_pt.read_bytes() == before
    forced = uniseg("weights", "--bundle", str(bundle), "--url", str(official_file), "--overwrite")
    assert forced.returncode == 0, forced.stderr[-2000:]


def test_weights_over_http_say_once_that_no_hash_was_published(official_fixture, official_file, tmp_path):
    """The release publishes no hash: one line of ours with the download's sha256 (recorded in the provenance),
    not MONAI's warning naming a temporary file; the progress bar names the downloaded file."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(official_file.parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            bundle = tiny_bundle(official_fixture, "upstream", "uniseg_pretrain", tmp_path / "b")
            run = uniseg(
                "weights", "--bundle", str(bundle), "--url", f"http://127.0.0.1:{server.server_port}/official.model"
            )
        finally:
            server.shutdown()
    assert run.returncode == 0, run.stderr[-2000:]
    assert (
        f"integrity of the download: not verified (no published hash to check); its sha256 is {sha256(official_file)}"
        in run.stderr
    )
    assert (
        "No hash value provided" not in run.stderr
        and "official.model" in run.stderr
        and "download.pt" not in run.stderr
    )
    provenance = json.loads((bundle / "models" / "model_provenance.json").read_text())
    assert provenance["source_sha256"] == sha256(official_file)


@pytest.mark.parametrize("failure", ["HTTP 404", "connection refused", "ftp", "wrong hash"])
def test_a_failed_http_download_is_only_our_one_line(official_fixture, tmp_path, capfd, failure):
    """No progress bar for a request that fails and no MONAI log line ("Download failed ... /tmp/...", "check_hash
    failed"): only ours; nothing installed."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the server's request log is not the command's output
            pass

    (tmp_path / "served.model").write_bytes(b"weights" * 100)
    handler = functools.partial(Quiet, directory=str(tmp_path))
    serves = failure in ("HTTP 404", "wrong hash")
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        if serves:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            bundle = tiny_bundle(official_fixture, "upstream", "uniseg_pretrain", tmp_path / "b")
            scheme, port = ("ftp" if failure == "ftp" else "http"), (server.server_port if serves else 9)
            url = f"{scheme}://127.0.0.1:{port}/{'served' if failure == 'wrong hash' else 'nope'}.model"
            if failure == "wrong hash":  # the hash large_files.yml publishes
                entry = {"path": "models/model.pt", "url": url, "hash_type": "sha256", "hash_val": "0" * 64}
                (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))
            before = listing(bundle)
            run = uniseg("weights", "--bundle", str(bundle), *(["--url", url] if failure != "wrong hash" else []))
        finally:
            server.shutdown() if serves else None
    lines = [x for x in run.stderr.strip().splitlines() if not x.startswith("served.model: ")]  # a download's bar
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith(
        f"uniseg: error: the weights downloaded from {url} do not have the published sha256 {'0' * 64}: "
        if failure == "wrong hash"
        else f"uniseg: error: could not fetch the weights from {url}: "
    )
    logged = "".join(capfd.readouterr())  # MONAI's log handler writes to the stream it was created with
    assert "failed" not in logged and not run.stdout, logged
    assert listing(bundle) == before


@pytest.mark.parametrize("download", ["downstream model", "other network", "text file", "missing file"])
def test_weights_refuses_what_is_not_the_bundles_uniseg(official_fixture, tmp_path, download):
    bundle = tiny_bundle(official_fixture, "upstream", "uniseg_pretrain", tmp_path)
    src = tmp_path / "download.model"
    if download == "downstream model":
        save_nnunet_v1(nnunet_v1_container(official_fixture["downstream_state_dict"]), src)
    elif download == "other network":
        torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, src)
    elif download == "text file":
        src.write_text("<html>Google Drive: quota exceeded</html>")
    before = listing(bundle)
    run = uniseg("weights", "--bundle", str(bundle), "--url", src.as_uri())
    assert run.returncode == 2 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert listing(bundle) == before  # nothing installed, nothing left behind


def test_weights_fetch_google_drive_through_gdown(official_fixture, official_file, tmp_path, monkeypatch):
    """The large_files.yml url goes to MONAI's download_url, which hands Google Drive to gdown (stubbed offline)."""
    import gdown

    calls = []

    def fake_download(url, output, quiet=False, **kwargs):
        calls.append(url)
        shutil.copyfile(official_file, output)
        return output

    monkeypatch.setattr(gdown, "download", fake_download)
    bundle = tiny_bundle(official_fixture, "upstream", "uniseg_pretrain", tmp_path)
    report = download_weights(bundle)
    assert calls == [OFFICIAL_URL]
    assert report["dst"] == str(bundle / "models" / "model.pt") and len(report["tasks"]) == 11
    assert json.loads(Path(report["provenance"]).read_text())["source"] == OFFICIAL_URL


def test_a_failed_download_is_one_line_but_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """What a download raises (here gdown's refusal) is a one-line ModelFileError; a bug is not disguised as one."""
    import gdown
    from gdown.exceptions import FileURLRetrievalError

    def refused(url, output, quiet=False, **kwargs):
        raise FileURLRetrievalError("Cannot retrieve the public link of the file")

    monkeypatch.setattr(gdown, "download", refused)
    with pytest.raises(ModelFileError, match=r"could not fetch the weights from .*: FileURLRetrievalError: Cannot"):
        fetch(OFFICIAL_URL, tmp_path / "model.pt")

    def bug(url, output, quiet=False, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(gdown, "download", bug)
    with pytest.raises(KeyError, match="a bug"):
        fetch(OFFICIAL_URL, tmp_path / "model.pt")


def test_fine_tuning_starts_from_the_fetched_pretraining(official_fixture, official_file, tmp_path):
    """`uniseg weights --bundle <fine-tuning bundle>` then the bundle's train.json, no other step: the network
    starts from the official encoder-decoder."""
    bundle = tiny_bundle(official_fixture, "downstream", "uniseg_finetune_btcv", tmp_path)
    run = uniseg("weights", "--bundle", str(bundle), "--url", official_file.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    assert read_model(bundle / "models" / "pretrained.pt").network_def["num_tasks"] == 11
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "train.json")
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
    parser.update({k: inference[k] for k in ("features", "kernel_sizes", "strides", "patch_size")})
    assert parser.get_parsed_content("pretrained") == str(bundle / "models" / "pretrained.pt")
    network = parser.get_parsed_content("network")
    upstream = convert_state_dict(official_fixture["upstream_state_dict"])
    assert torch.equal(network.state_dict()["encoder.2.0.conv.weight"], upstream["encoder.2.0.conv.weight"])
    assert torch.equal(
        network.state_dict()["decoder.0.upsample.conv.weight"], upstream["decoder.0.upsample.conv.weight"][:-1]
    )
    # the fine-tuned model's files will carry the official weights' licence
    saved = description(network, parser.get_parsed_content("registry"))["provenance"].state_dict()
    assert "non-commercial" in saved["licence"] and saved["pretrained"] == str(bundle / "models" / "pretrained.pt")


@pytest.mark.parametrize("url", ["a folder", "a file:// folder", "the file it would replace"])
def test_weights_url_naming_a_folder_or_the_target_is_one_line(official_fixture, tmp_path, monkeypatch, capsys, url):
    bundle = tiny_bundle(official_fixture, "upstream", "uniseg_pretrain", tmp_path)
    target = bundle / "models" / "model.pt"
    save_nnunet_v1(nnunet_v1_container(official_fixture["upstream_state_dict"]), target)  # the user's own file
    sources = {"a folder": str(tmp_path), "a file:// folder": tmp_path.as_uri()}
    source = sources.get(url, str(target))
    before = {p: p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))}
    with pytest.raises(SystemExit) as done:
        main(["weights", "--bundle", str(bundle), "--url", source, "--overwrite"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(lines) == 1, lines
    reason = f"is the source file {target} itself" if url == "the file it would replace" else "is a folder"
    assert reason in lines[0]
    assert {p: p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))} == before
