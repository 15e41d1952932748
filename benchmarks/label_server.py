"""MONAI Label server timings on this machine's CPU (README: "MONAI Label / 3D Slicer", measured numbers).

Starts Orthanc (DICOMweb) with the sample CT series of ../shared and ``uniseg label-server`` on it, once with the
tests' tiny network and once with the paper-size network (random weights), and a server on a local folder of two
phantom CT volumes for training. Prints: server start time (process start to the first /info/ answer), /infer
latency of the sample CT (first request: DICOMweb fetch + conversion + inference; then cached), 8 concurrent
/infer (wall time, throughput), the server's peak RSS, and a /train request of 2 iterations.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/label_server.py   # needs `make orthanc` (root)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import free_port, monailabel_bundle
from test_label_server import MODEL, PLUGINS, infer, label_server, running, sample_series, server_env

from uniseg_monai.data.phantoms import generate_phantoms
from uniseg_monai.engine.wiring import registry_for_datalist


def peak_rss_mib(pid: int) -> float:
    return int(next(x for x in open(f"/proc/{pid}/status") if x.startswith("VmHWM")).split()[1]) / 1024


def timed(call, *args, **kwargs) -> tuple[float, requests.Response]:
    start = time.perf_counter()
    response = call(*args, **kwargs)
    assert response.status_code == 200, response.text
    return time.perf_counter() - start, response


def serve(stack: ExitStack, studies: str, bundle: Path, root: Path) -> tuple[str, int]:
    command, base = label_server(studies, bundle, root)
    start = time.perf_counter()
    pid = stack.enter_context(running(command, f"{base}/info/", root / "server.log", server_env(root)))
    print(f"  server start: {time.perf_counter() - start:.1f} s")
    return base, pid


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="label_server_bench_"))
    datalist = generate_phantoms(root / "phantoms")
    registry = registry_for_datalist(datalist)
    (root / "series").mkdir()
    series = sample_series(root / "series")
    uid = series[0].SeriesInstanceUID
    with ExitStack() as stack:
        port = free_port()
        config = {"HttpPort": port, "DicomServerEnabled": False, "StorageDirectory": str(root / "db"),
                  "IndexDirectory": str(root / "db"), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so"), str(PLUGINS / "libOrthancGdcm.so")]}  # fmt: skip
        (root / "orthanc.json").write_text(json.dumps(config))
        orthanc = f"http://127.0.0.1:{port}"
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        stack.enter_context(running([binary, str(root / "orthanc.json")], f"{orthanc}/system", root / "orthanc.log"))
        for path in sorted((root / "series").iterdir()):
            requests.post(f"{orthanc}/instances", data=path.read_bytes(), timeout=60).raise_for_status()

        for size, settings in (("tiny", {}), ("paper", {"patch_size": [192, 192, 64], "base_features": 32})):
            print(f"{size} network, DICOMweb datastore (sample CT 512x512x20, task ph_organs):")
            bundle = monailabel_bundle(MODEL, registry, root / size, **settings)
            with ExitStack() as server:
                base, pid = serve(server, f"{orthanc}/dicom-web", bundle, root / size)
                first, _ = timed(infer, base, uid, "ph_organs")
                again, _ = timed(infer, base, uid, "ph_organs")
                print(f"  /infer: first {first:.1f} s (fetch + convert + infer), then {again:.1f} s")
                start = time.perf_counter()
                tasks = [("ph_organs", "ph_liver")[n % 2] for n in range(8)]
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(timed, [infer] * 8, [base] * 8, [uid] * 8, tasks))
                wall = time.perf_counter() - start
                rss = peak_rss_mib(pid)
                print(f"  8 concurrent /infer: {wall:.1f} s ({8 / wall:.2f} requests/s); peak RSS {rss:.0f} MiB")

        print("tiny network, local datastore (2 phantom CT volumes with submitted ph_liver labels):")
        data = json.loads(datalist.read_text())
        studies = root / "studies"
        studies.mkdir()
        bundle = monailabel_bundle(MODEL, registry, root / "train")
        with ExitStack() as server:
            base, _ = serve(server, str(studies), bundle, root / "train")
            for item in [i for i in data["training"] if i["task"] == "ph_liver"][:2]:
                image = shutil.copy(datalist.parent / item["image"], studies)
                image_id = Path(image).name.removesuffix(".nii.gz")
                time.sleep(1)  # the datastore notices the new file
                with open(datalist.parent / item["label"], "rb") as f:
                    requests.put(f"{base}/datastore/label", params={"image": image_id, "tag": "final"},
                                 files={"label": (f"{image_id}.nii.gz", f)}, timeout=60).raise_for_status()  # fmt: skip
            request = {"task": "ph_liver", "max_epochs": 1, "val_split": 0.5}
            took, _ = timed(requests.post, f"{base}/train/{MODEL}", params={"run_sync": "true"}, json=request)
            print(f"  /train (2 iterations + validation of 1 case, run_sync): {took:.1f} s")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
