"""MONAI Label's real server (``uniseg label-server``: ``monailabel start_server`` 0.8.5 on the UniSeg app) over HTTP,
on two real datastores: a PACS (Orthanc with its DICOMweb and GDCM plugins, Debian packages, holding the sample CT
series of ../shared) and a local folder of phantom NIfTI images. Both servers run as subprocesses on free loopback
ports and are stopped after the tests, also on failure.

The model is a tiny UniSeg of the 4 phantom tasks (random weights). What shows that the served maps are right is
that each equals MONAI Label's ``BundleInferTask`` run in this process on the same image, task and model file
(tests/test_monailabel.py shows that one equals the bundle's own inference), while the two tasks of one CT volume
give different maps; after a /train request, the same holds with the new model file."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from conftest import free_port, monailabel_bundle, shared_path
from pydicom.uid import generate_uid

from uniseg_monai.apps.label_server import monailabel_imports
from uniseg_monai.engine.wiring import registry_for_datalist

pytestmark = pytest.mark.integration

SAMPLE = "data/real_samples/totalseg_examples/ct_dicom"
PLUGINS = Path("/usr/share/orthanc/plugins")
MODEL = "uniseg_pretrain"
READY_S = 180  # bounded waits for a server to answer


def required(ok: bool, what: str) -> None:
    """A missing external part fails under CI=true (``make test`` installs it: ``make orthanc``), skips elsewhere."""
    if ok:
        return
    message = (
        f"{what} is missing: install it as root with `make orthanc` (apt-get install orthanc orthanc-dicomweb "
        "orthanc-gdcm)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def running(command: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """``command`` as a subprocess (output in ``log``) until the block ends, once ``ready_url`` answers (at most
    :data:`READY_S` s); yields its pid. Stopped (SIGTERM, then SIGKILL) also when the block fails."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + READY_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[0]} ended with {process.returncode}: {log.read_text()[-3000:]}")
            try:
                if requests.get(ready_url, timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{ready_url} did not answer within {READY_S} s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def label_server(studies: str, bundle: Path, root: Path) -> tuple[list[str], str]:
    """The command that serves ``bundle`` on ``studies`` on a free port, and the server's URL."""
    port = free_port()
    command = [sys.executable, "-m", "uniseg_monai", "label-server", "--studies", studies, "--bundle", str(bundle),
               "--port", str(port), "--app_dir", str(root / "app")]  # fmt: skip
    return command, f"http://127.0.0.1:{port}"


def server_env(root: Path) -> dict[str, str]:
    """The server's environment: its DICOMweb cache in ``root``, one thread, this checkout's package first."""
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    return {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "dicomweb_cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def infer(base: str, image: str, task: str, **params) -> requests.Response:
    """POST /infer of ``image`` under ``task`` asking for the label image."""
    return requests.post(f"{base}/infer/{MODEL}", params={"image": image, "output": "image"},
                         data={"params": json.dumps({"task": task, **params})}, timeout=600)  # fmt: skip


def label_of(response: requests.Response) -> nib.Nifti1Image:
    assert response.status_code == 200, response.text
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


def reference(bundle: Path, image: Path, task: str) -> np.ndarray:
    """MONAI Label's BundleInferTask in this process on the bundle's current model file."""
    monailabel_imports()
    from monailabel.tasks.infer.bundle import BundleInferTask

    label_file, _ = BundleInferTask(str(bundle), conf={})({"image": str(image), "task": task, "device": "cpu"})
    return np.asarray(nib.load(label_file).dataobj)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(response: requests.Response, status: int, *words: str) -> None:
    """A bad request answered with ``status`` and one line naming the problem, no traceback."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert all(w in detail for w in words) and "Traceback" not in detail and "\n" not in detail, detail


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[str]:
    """Orthanc on a free loopback port (DICOMweb, GDCM transcoding of the JPEG 2000 sample), storage in tmp."""
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")  # sbin: not on a user's PATH
    required(binary is not None, "Orthanc (Debian package orthanc)")
    plugins = [PLUGINS / "libOrthancDicomWeb.so", PLUGINS / "libOrthancGdcm.so"]
    required(all(p.is_file() for p in plugins), f"the Orthanc plugins {[str(p) for p in plugins]}")
    root, port = tmp_path_factory.mktemp("orthanc"), free_port()
    config = {"Name": "uniseg-test", "HttpPort": port, "DicomServerEnabled": False, "DicomPort": 0,
              "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"), "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [str(p) for p in plugins],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}  # fmt: skip
    (root / "orthanc.json").write_text(json.dumps(config))
    url = f"http://127.0.0.1:{port}"
    with running([binary, str(root / "orthanc.json")], f"{url}/system", root / "orthanc.log"):
        yield url


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("label_server")


def sample_series(dst: Path) -> list[pydicom.Dataset]:
    """The sample CT series with its (anonymised away) study / series / instance UIDs filled in, stored uncompressed:
    Debian bookworm's Orthanc 1.10.1 with GDCM 3.0.21 segfaulted now and then transcoding its JPEG 2000 for WADO-RS
    (in libgdcmMSFF, also with Gdcm.Throttling 1), which no test of ours should hang on (bundle docs: Orthanc)."""
    study, series = generate_uid(), generate_uid()
    datasets = []
    for path in sorted(shared_path(SAMPLE).iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, series, 3
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.decompress()  # explicit VR little endian
        ds.save_as(dst / path.name)
        datasets.append(ds)
    return datasets


def test_dicomweb_infer_segments_a_pacs_series_and_stores_its_dicom_seg_in_the_study(orthanc, phantoms, tmp_path):
    from dicomweb_client import DICOMwebClient
    from monai.transforms import LoadImage
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    (tmp_path / "series").mkdir()
    datasets = sample_series(tmp_path / "series")
    ct = datasets[0]
    pacs = DICOMwebClient(f"{orthanc}/dicom-web")
    pacs.store_instances(datasets)  # STOW-RS
    registry = registry_for_datalist(phantoms)
    bundle = monailabel_bundle(MODEL, registry, tmp_path)
    command, base = label_server(f"{orthanc}/dicom-web", bundle, tmp_path)
    with running(command, f"{base}/info/", tmp_path / "server.log", server_env(tmp_path)):
        refused(infer(base, "1.2.3.4", "ph_organs"), 404, "image '1.2.3.4' is not in the datastore")
        request = {"image": ct.SeriesInstanceUID, "output": "all"}
        params = {"params": json.dumps({"task": "ph_organs", "dicom_seg": True})}
        response = requests.post(f"{base}/infer/{MODEL}", params=request, data=params, timeout=600)
        assert response.status_code == 200, response.text
        parts = MultipartDecoder.from_response(response).parts
        params = json.loads(next(p.text for p in parts if b"application/json" in p.headers[b"Content-Type"]))
        label_bytes = next(p.content for p in parts if b"application/json" not in p.headers[b"Content-Type"])
    (tmp_path / "label.nii.gz").write_bytes(label_bytes)
    label = nib.load(tmp_path / "label.nii.gz")
    image = LoadImage(image_only=True)(str(tmp_path / "series"))  # the series as MONAI reads it (RAS)
    assert label.shape == tuple(image.shape) == (512, 512, 20)
    np.testing.assert_allclose(label.affine, np.asarray(image.affine), atol=1e-3)
    labels = np.asarray(label.dataobj)

    # the SEG is a new series of the CT's study in Orthanc, and holds the served map
    stored = params["dicom_seg"]
    assert stored["StudyInstanceUID"] == ct.StudyInstanceUID
    found = pacs.search_for_series(ct.StudyInstanceUID, search_filters={"Modality": "SEG"})
    assert [pydicom.Dataset.from_json(s).SeriesInstanceUID for s in found] == [stored["SeriesInstanceUID"]]
    (seg,) = pacs.retrieve_series(ct.StudyInstanceUID, stored["SeriesInstanceUID"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    names = {s.SegmentNumber: s.SegmentLabel for s in seg.SegmentSequence}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    counts = dict.fromkeys(names, 0)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        counts[group.SegmentIdentificationSequence[0].ReferencedSegmentNumber] += int(frame.sum())
    classes = registry["ph_organs"].labels
    assert {names[n]: c for n, c in counts.items()} == {
        classes[k]: int((labels == k).sum()) for k in range(1, len(classes)) if (labels == k).any()
    }


@pytest.fixture(scope="module")
def local(phantoms, bundle_root) -> Iterator[tuple[str, Path, Path, int]]:
    """The server on a folder of two phantom CT volumes: (URL, bundle, studies folder, server pid)."""
    data = json.loads(phantoms.read_text())
    studies = bundle_root / "studies"
    studies.mkdir()
    for item in [i for i in data["training"] if i["task"] == "ph_liver"][:2]:
        shutil.copy(phantoms.parent / item["image"], studies)
    bundle = monailabel_bundle(MODEL, registry_for_datalist(phantoms), bundle_root)
    command, base = label_server(str(studies), bundle, bundle_root)
    with running(command, f"{base}/info/", bundle_root / "server.log", server_env(bundle_root)) as pid:
        yield base, bundle, studies, pid


def images(studies: Path) -> dict[str, Path]:
    """Datastore image id -> file."""
    return {p.name.removesuffix(".nii.gz"): p for p in sorted(studies.glob("*.nii.gz"))}


def test_local_infer_serves_each_task_in_the_image_geometry_and_refuses_bad_requests_with_4xx(local, phantoms):
    base, bundle, studies, pid = local
    info = requests.get(f"{base}/info/", timeout=60).json()
    registry = registry_for_datalist(phantoms)
    assert info["models"][MODEL]["tasks"] == {
        t.name: {"labels": {n: k for k, n in enumerate(t.labels) if k}, "modalities": list(t.modalities)}
        for t in registry.values()
    }
    (image_id, path), *_ = images(studies).items()
    source = nib.load(path)
    maps = {}
    for task in ("ph_organs", "ph_liver"):
        label = label_of(infer(base, image_id, task))
        assert label.shape == source.shape
        np.testing.assert_allclose(label.affine, source.affine, atol=1e-4)
        maps[task] = np.asarray(label.dataobj)
        np.testing.assert_array_equal(maps[task], reference(bundle, path, task))
    assert not np.array_equal(maps["ph_organs"], maps["ph_liver"])

    # 8 concurrent requests, the two tasks alternating: all served, each its task's map
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: infer(base, image_id, ("ph_organs", "ph_liver")[n % 2]), range(8)))
    for n, response in enumerate(results):
        np.testing.assert_array_equal(np.asarray(label_of(response).dataobj), maps[("ph_organs", "ph_liver")[n % 2]])
    peak = int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM")).split()[1])
    print(f"label server peak RSS after 8 concurrent /infer: {peak / 1024:.0f} MiB")

    refused(infer(base, "no_such_image", "ph_liver"), 404, "'no_such_image' is not in the datastore")
    refused(infer(base, image_id, "ph_nope"), 400, "has no task 'ph_nope'", "ph_organs")
    refused(infer(base, image_id, "ph_brain"), 400, "1 channel(s), task 'ph_brain' expects 4")
    refused(infer(base, image_id, ""), 400, "needs a task")
    refused(requests.post(f"{base}/infer/nope", params={"image": image_id}, timeout=60), 404, "no model 'nope'")
    train = requests.post(f"{base}/train/{MODEL}", params={"run_sync": "true"}, json={"task": "ph_liver"}, timeout=60)
    refused(train, 400, "no submitted labels")


def test_local_train_on_submitted_labels_swaps_the_served_model_atomically(local, phantoms):
    base, bundle, studies, _ = local
    data = json.loads(phantoms.read_text())
    labels = {Path(i["image"]).name.removesuffix(".nii.gz"): phantoms.parent / i["label"] for i in data["training"]
              if i["task"] == "ph_liver"}  # fmt: skip
    for image_id in images(studies):
        with open(labels[image_id], "rb") as f:
            saved = requests.put(f"{base}/datastore/label", params={"image": image_id, "tag": "final"},
                                 files={"label": (f"{image_id}.nii.gz", f)}, timeout=60)  # fmt: skip
        assert saved.status_code == 200, saved.text
    model = bundle / "models" / "model.pt"
    before = sha(model)
    (image_id, path), *_ = images(studies).items()
    old = reference(bundle, path, "ph_liver")

    # /train (2 iterations) while /infer requests come in: every request succeeds, each map from one whole model
    with ThreadPoolExecutor(4) as pool:
        train = pool.submit(requests.post, f"{base}/train/{MODEL}", params={"run_sync": "true"},
                            json={"task": "ph_liver", "max_epochs": 1, "val_split": 0.5}, timeout=600)  # fmt: skip
        during = [pool.submit(infer, base, image_id, "ph_liver") for _ in range(3)]
        assert train.result().status_code == 200, train.result().text
        served = [np.asarray(label_of(r.result()).dataobj) for r in during]
    assert sha(model) != before
    (kept,) = (bundle / "models").glob("model_before_*.pt")
    assert sha(kept) == before
    new = reference(bundle, path, "ph_liver")
    assert not np.array_equal(new, old)  # the two models segment differently: the checks below tell them apart
    assert all(np.array_equal(m, old) or np.array_equal(m, new) for m in served)
    np.testing.assert_array_equal(np.asarray(label_of(infer(base, image_id, "ph_liver")).dataobj), new)


def test_label_server_refuses_a_bad_start_in_one_line_before_writing_anything(tmp_path, capsys):
    """Each start-up mistake is refused before the server starts: one line naming the option; no app folder is
    written, the user's files are kept."""
    from uniseg_monai.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(Path(__file__).parents[1] / "bundles" / MODEL, bundle, ignore=shutil.ignore_patterns("model*.pt"))
    weights = bundle / "models" / "model.pt"
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "user_app").mkdir()
    (tmp_path / "user_app" / "main.py").write_text("# the user's app\n")
    app = tmp_path / "app"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cases = [
            ({}, f"no weights at {weights}: get them with `uniseg weights --bundle {bundle}` (see README, 'Use a "
             "pretrained model'), or train the bundle"),
            ({"studies": str(tmp_path / "missing")}, f"--studies {tmp_path / 'missing'} is no folder: give a folder "
             "of NIfTI images or a DICOMweb URL"),
            ({"port": "http"}, "--port takes a whole number from 1 to 65535 (e.g. 8000), got 'http'"),
            ({"port": "-5"}, "--port takes a whole number from 1 to 65535 (e.g. 8000), got -5"),
            ({"port": "70000"}, "--port takes a whole number from 1 to 65535 (e.g. 8000), got 70000"),
            ({"port": str(taken)}, f"--port {taken} is in use on 127.0.0.1 (another server?): choose another --port"),
            ({"host": "999.1.1.1"}, "--host 999.1.1.1 does not resolve (Name or service not known): give an address "
             "of this machine (127.0.0.1 serves this machine only, 0.0.0.0 the network)"),
            ({"app_dir": str(tmp_path / "a_file")}, f"--app_dir {tmp_path / 'a_file'} is a file: give a folder for "
             "MONAI Label's app (created if missing)"),
            ({"app_dir": str(tmp_path / "user_app")}, f"--app_dir {tmp_path / 'user_app'} holds another main.py: give "
             "an empty or new folder as --app_dir"),
        ]  # fmt: skip
        for options, line in cases:
            if options:
                weights.touch()  # only its presence is checked before the start
            argv = {"studies": str(tmp_path), "bundle": str(bundle), "app_dir": str(app), **options}
            with pytest.raises(SystemExit) as ended:
                main(["label-server", *(word for key, value in argv.items() for word in (f"--{key}", value))])
            assert (ended.value.code, capsys.readouterr().err.strip()) == (2, f"uniseg: error: {line}"), options
    assert not app.exists() and (tmp_path / "a_file").read_text() == "not a folder"
    assert (tmp_path / "user_app" / "main.py").read_text() == "# the user's app\n"
