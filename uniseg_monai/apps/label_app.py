"""The MONAI Label app serving UniSeg bundles (``uniseg label-server``; README: "MONAI Label / 3D Slicer").

MONAI Label's own ``BundleInferTask`` / ``BundleTrainTask`` run each bundle (the task chosen per request through the
bundle's ``displayable_configs``); this app adds what MONAI Label's sample apps lack for UniSeg: the label names of
every task in ``/info/``, requests checked before they run (unknown image, task or model, an image whose channel count
is not the task's, a train request without labels: one line, answered 4xx by :mod:`uniseg_monai.apps.label_asgi`),
and a DICOM SEG written by :func:`uniseg_monai.data.dicom_seg.build_seg` and stored back in the DICOMweb server
(request parameter ``"dicom_seg": true``; MONAI Label 0.8.5's own writer needs pydicom-seg, broken under pydicom 3).
Import it after :func:`uniseg_monai.apps.label_server.monailabel_imports`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import partition_dataset
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

from uniseg_monai import __version__
from uniseg_monai.apps.bundles import find_bundle
from uniseg_monai.core.errors import InputError, UsageError
from uniseg_monai.data.check import check_run_items
from uniseg_monai.data.dicom_seg import build_seg, choose_series, source_instances
from uniseg_monai.model_io.model_files import MODEL_FILE, model_tasks
from uniseg_monai.tasks import TaskRegistry, check_task_name

BUNDLES_CONF = "bundles"  # --conf bundles PATH[,PATH...]: the bundle folders (or names) served, one model each


class UniSegLabelApp(MONAILabelApp):
    """One MONAI Label model per bundle of ``conf["bundles"]`` (its folder name), inference and training."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        names = [b for b in conf.get(BUNDLES_CONF, "").split(",") if b]
        if not names:
            raise UsageError(f"no bundle to serve: give --conf {BUNDLES_CONF} PATH (uniseg label-server --bundle)")
        self.bundles = {(p := find_bundle(b)).name: p.resolve() for b in names}
        self._tasks: dict[str, tuple[float, TaskRegistry]] = {}
        super().__init__(app_dir, studies, conf, name="UniSeg", description="UniSeg bundles", version=__version__)

    def init_infers(self) -> dict[str, BundleInferTask]:
        return {name: BundleInferTask(str(path), self.conf) for name, path in self.bundles.items()}

    def init_trainers(self) -> dict[str, BundleTrainTask]:
        return {name: BundleTrainTask(str(path), self.conf) for name, path in self.bundles.items()}

    def _download_dcmqi_tools(self) -> None:
        """MONAI Label downloads dcmqi from GitHub for a DICOMweb datastore; this app writes DICOM SEG itself."""

    def registry(self, model: str) -> TaskRegistry:
        """The tasks of ``model``'s ``models/model.pt`` (re-read when the file changes, e.g. after training)."""
        folder = self.bundles[model] / "models"
        stamp = (folder / MODEL_FILE).stat().st_mtime if (folder / MODEL_FILE).is_file() else 0.0
        if self._tasks.get(model, (None,))[0] != stamp:
            self._tasks[model] = (stamp, model_tasks(folder))
        return self._tasks[model][1]

    def info(self, request: Any = None) -> dict[str, Any]:
        """MONAI Label's info, each model with ``tasks``: task name -> ``labels`` (class name -> label value, the
        background left out) and ``modalities`` (the image channels the task takes, in order)."""
        meta = super().info()
        for name, model in meta["models"].items():
            model["tasks"] = {
                t.name: {"labels": {n: k for k, n in enumerate(t.labels) if k}, "modalities": list(t.modalities)}
                for t in self.registry(name).values()
            }
        return meta

    def _model(self, request: dict[str, Any]) -> str:
        model = request.get("model")
        if model not in self.bundles:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, f"no model {model!r}: this server has {sorted(self.bundles)}"
            )
        return model

    def _task(self, model: str, request: dict[str, Any]) -> str:
        """The request's task, which must be one of the model's; "" when it names none (a one-task model)."""
        registry, task = self.registry(model), request.get("task")
        if not isinstance(task, str) or not task:
            return ""
        check_task_name(task, "MONAI Label request: task")
        if task not in registry:
            raise UsageError(
                f"MONAI Label request: model {model!r} has no task {task!r}: choose one of {registry.names}"
            )
        return task

    def _one_task_or_named(self, model: str, task: str, what: str) -> TaskRegistry:
        """``model``'s tasks; a request to a model of several tasks must name one."""
        registry = self.registry(model)
        if len(registry) > 1 and not task:
            raise UsageError(
                f"MONAI Label request: {what} with {model!r} needs a task: set 'task' to one of {registry.names}"
            )
        return registry

    def _image_path(self, image: str) -> str:
        """The local file of the request's image id (a DICOMweb series is fetched); a one-line error if unknown."""
        datastore = self.datastore()
        if isinstance(datastore, DICOMWebDatastore):
            known = bool(datastore._client.search_for_series(search_filters={"SeriesInstanceUID": image}))
        else:
            known = bool(datastore.get_image_uri(image))
        if not known:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"image {image!r} is not in the datastore {datastore.name()}: use an id that GET /datastore/ lists",
            )
        return datastore.get_image_uri(image)

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's inference after the request's checks; with ``"dicom_seg": true`` (DICOMweb datastore) the
        result's ``params`` gain ``dicom_seg``: the UIDs of the SEG stored in the study of the image."""
        model = self._model(request)
        task = self._task(model, request)
        image = request.get("image")
        path = image if isinstance(image, str) and os.path.exists(image) else self._image_path(str(image))
        registry = self._one_task_or_named(model, task, "infer")
        check_run_items([[{"image": path}]], registry, task or registry.names[0], labelled=False)
        result = super().infer({**request, "image": path} if path != image else request, datastore)
        if request.get("dicom_seg"):
            stored = self._store_seg(model, task, image, result)
            result["params"] = {**(result.get("params") or {}), "dicom_seg": stored}
        return result

    def _store_seg(self, model: str, task: str, image: str, result: dict[str, Any]) -> dict[str, str]:
        """The DICOM SEG of ``result``'s label map over the series ``image``, stored in the DICOMweb server (STOW-RS)
        as a new series of the image's study; its UIDs."""
        datastore = self.datastore()
        if not isinstance(datastore, DICOMWebDatastore):
            raise UsageError("MONAI Label request: dicom_seg needs a DICOMweb datastore (--studies http://...)")
        registry = self.registry(model)
        chosen = registry[task] if task else registry[registry.names[0]]
        series = choose_series(Path(datastore._datastore.image_path()) / image, image)
        instances = source_instances(series.files)
        label = nib.load(result["file"])
        maps = {chosen.name: np.asarray(label.dataobj).astype(np.uint8)}
        seg, _ = build_seg(maps, label.affine, [chosen], instances, "binary", False, __version__, f"UniSeg {model}")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "seg.dcm")
            seg.save_as(path)
            dicom_web_upload_dcm(path, datastore._client)
        return {"StudyInstanceUID": str(seg.StudyInstanceUID), "SeriesInstanceUID": str(seg.SeriesInstanceUID)}

    def train(self, request: dict[str, Any]) -> Any:
        """MONAI Label's training of the request's task on the datastore's submitted labels, after the checks."""
        model = self._model(request)
        task = self._task(model, request)
        labelled = self.datastore().get_labeled_images(DefaultLabelTag.FINAL)
        if not labelled:
            raise InputError(
                f"MONAI Label request: no submitted labels in the datastore {self.datastore().name()} to train "
                f"{model!r} on: submit labels first (PUT /datastore/label, Slicer's 'Submit Label')"
            )
        self._one_task_or_named(model, task, "train")
        split = request.get("val_split", 0.2)
        if split >= 0 and not partition_dataset(labelled, ratios=[1 - split, split])[1]:  # as BundleTrainTask splits
            raise InputError(
                f"MONAI Label request: {len(labelled)} submitted label(s) with val_split {split} leave no validation "
                f"case, so {model!r}'s model.pt would not change: submit more labels or raise val_split"
            )
        return super().train(request)
