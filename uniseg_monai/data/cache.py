"""Where a training run keeps its pre-processed cases: in memory (MONAI ``CacheDataset``) or on disk
(:class:`DiskCacheDataset`), chosen by :func:`bundle_dataset` from the RAM a full in-memory cache would need.

The cache holds the output of the transforms before the first random one (``train#deterministic_transforms`` and
the class indices and padding of ``train#sampling_transforms``); the crop and the augmentation run on every draw.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import types
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.utils import convert_to_tensor

from uniseg_monai.core.atomic import write_atomic
from uniseg_monai.core.errors import UsageError
from uniseg_monai.core.progress import progress_bar
from uniseg_monai.data.check import read_header
from uniseg_monai.data.geometry import resampled_voxels
from uniseg_monai.data.memory import GIB, available_memory
from uniseg_monai.tasks import TaskRegistry, resolve_task

logger = logging.getLogger(__name__)

DATASET_TYPES = ("auto", "memory", "disk")
MEMORY_FRACTION = 0.5  # "auto" caches in memory when the cache needs at most this share of the available RAM

# everything a cache file holds: tensors, MetaTensors with numpy arrays and MONAI enums in their meta data and applied
# operations (torch's storages are resolved by torch.load before these are asked)
CACHE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._tensor", "_rebuild_from_type_v2"), ("collections", "OrderedDict"),
    ("monai.data.meta_tensor", "MetaTensor"), ("monai.utils.enums", "MetaKeys"), ("monai.utils.enums", "SpaceKeys"),
    ("monai.utils.enums", "TraceKeys"), ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),  # numpy 2 / 1
}  # fmt: skip


class _CacheUnpickler(pickle.Unpickler):
    """Python's (C) unpickler restricted to :data:`CACHE_GLOBALS` (the Python documentation's "restricting
    globals"): a file can build nothing else, and a case loads faster than with ``weights_only=True``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in CACHE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a cache file")
        return super().find_class(module, name)


_CACHE_PICKLE = types.ModuleType("uniseg_cache_pickle")  # the pickle_module of torch.load
_CACHE_PICKLE.Unpickler = _CacheUnpickler  # type: ignore[attr-defined]


def load_case(path: str | Path) -> Any:
    """A cache file, memory-mapped (a crop reads only its pages; the page cache is shared between processes)."""
    return torch.load(path, mmap=True, weights_only=False, pickle_module=_CACHE_PICKLE)


def _files(item: Mapping[str, Any]) -> list[str]:
    """The image file(s) (one per channel, or one) and the label file of an item."""
    values = [item[key] for key in ("image", "label") if key in item]
    return [str(p) for v in values for p in (v if isinstance(v, list) else [v])]


def item_hash(item: Mapping[str, Any]) -> bytes:
    """MONAI's ``pickle_hashing`` of the item with the size and modification time of its files, so a replaced file
    is pre-processed again."""
    stats = [(p, s.st_size, s.st_mtime_ns) for p in _files(item) for s in [os.stat(p)]]
    return pickle_hashing({**item, "_files": stats})


class DiskCacheDataset(PersistentDataset):
    """MONAI's ``PersistentDataset`` for training sets larger than memory: one ``.pt`` file per case in
    ``cache_dir``, named by :func:`item_hash` and the hash of the cached transforms (a change of either
    pre-processes the case again).

    Files are written beside their final name and renamed (never a partial file under that name, also when killed,
    and safe when several processes fill one folder); a file that cannot be read is pre-processed again, not used.
    Files are memory-mapped: a random crop reads the pages of its patch, not the volume, and the page cache is
    shared by all processes. :meth:`fill` pre-processes the cases not cached yet, in parallel.
    """

    def __init__(self, data: Sequence, transform: Callable, cache_dir: str | Path, num_workers: int = 1) -> None:
        super().__init__(data, transform, cache_dir, hash_func=item_hash, hash_transform=pickle_hashing,
                         track_meta=True)  # fmt: skip
        self.num_workers = max(int(num_workers), 1)

    def cache_file(self, item: Mapping[str, Any]) -> Path:
        return self.cache_dir / f"{self.hash_func(item).decode()}{self.transform_hash}.pt"

    def _load(self, path: Path) -> Any:
        """The cached case, memory-mapped; None when missing or unreadable (truncated, empty, not a cache file: every
        file written is loaded once by :meth:`_build`, so a file that fails later is damaged)."""
        if not path.is_file():
            return None
        try:
            return load_case(path)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            logger.warning(f"{path}: unreadable cache file ({str(err).splitlines()[0][:200]}), pre-processing again")
            return None

    def _build(self, item: Mapping[str, Any], path: Path) -> Any:
        """Pre-process ``item``, write it to ``path`` and return it loaded from there."""
        data = convert_to_tensor(self._pre_transform(deepcopy(item)), convert_numeric=False, track_meta=True)
        write_atomic(path, lambda f: torch.save(data, f))
        try:
            return load_case(path)
        except pickle.UnpicklingError as err:  # a type CACHE_GLOBALS lacks: a bug, not a damaged file
            path.unlink(missing_ok=True)
            raise TypeError(f"{_files(item)[0]}: its pre-processed case does not load back ({err}); "
                            "--dataset_type memory avoids the disk cache") from err  # fmt: skip

    def _cachecheck(self, item_transformed: Mapping[str, Any]) -> Any:
        path = self.cache_file(item_transformed)
        data = self._load(path)
        return self._build(item_transformed, path) if data is None else data

    def fill(self, rank: int = 0, world_size: int = 1) -> int:
        """Pre-process every case without a readable cache file (``num_workers`` threads, a progress bar); returns
        how many. Rank ``r`` of ``world_size`` processes filling one folder starts at the r-th share of the cases,
        so they mostly skip each other's work."""
        start = rank * len(self.data) // max(world_size, 1)
        order = list(self.data[start:]) + list(self.data[:start])

        def one(item: Mapping[str, Any]) -> bool:
            path = self.cache_file(item)
            if self._load(path) is not None:
                return False
            self._build(item, path)
            return True

        with ThreadPool(self.num_workers) as pool:
            done = progress_bar(pool.imap_unordered(one, order), total=len(order), desc="disk cache", unit="case")
            return sum(done)


def cache_bytes(items: Sequence[Mapping[str, Any]], registry: TaskRegistry, default: str = "") -> int:
    """Bytes of the items once pre-processed, from their headers: voxels at the task spacing x (image channels +
    label) x 4 (float32)."""
    total = 0
    for item in progress_bar(items, show=len(items) >= 500, desc="cache size", unit="case"):
        task = resolve_task(item, registry, default)
        head = read_header(_files(item)[0])
        total += 4 * resampled_voxels(head.shape, head.affine, task) * (task.in_channels + ("label" in item))
    return total


def _rank() -> tuple[int, int]:
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def bundle_dataset(
    data: Sequence[Mapping[str, Any]],
    transform: Callable,
    registry: TaskRegistry,
    default: str = "",
    dataset_type: str = "auto",
    cache_rate: float = 1.0,
    cache_dir: str = "",
    ckpt_dir: str | Path = ".",
    num_workers: int = 0,
    memory_fraction: float = MEMORY_FRACTION,
    copy_cache: bool = True,
) -> Dataset:
    """The dataset of a bundle run (``train#dataset``, ``validate#dataset``).

    ``dataset_type``: ``memory`` (``CacheDataset`` of ``cache_rate`` of the cases; refused when that needs more
    than ``memory_fraction`` of the available RAM, times the processes on this machine), ``disk``
    (:class:`DiskCacheDataset` in ``cache_dir``, default ``<ckpt_dir>/cache``, filled now), ``auto`` (memory when
    it fits, else disk; the numbers are logged). ``cache_rate`` 0 caches nothing (every draw loads the files).
    ``copy_cache`` false: the in-memory cache hands out its items uncopied (training's crop copies its patch).
    """
    if dataset_type not in DATASET_TYPES:
        raise UsageError(f"--dataset_type must be one of {', '.join(DATASET_TYPES)}, got {dataset_type!r}")
    if isinstance(cache_rate, bool) or not isinstance(cache_rate, int | float) or not 0 <= cache_rate <= 1:
        raise UsageError(f"--cache_rate must be a number in [0, 1], got {cache_rate!r}")
    if not data or cache_rate == 0:
        return CacheDataset(data, transform, cache_rate=0, num_workers=num_workers)
    if dataset_type != "disk":
        copies = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: one cache per process on this machine
        need = cache_rate * cache_bytes(data, registry, default) * copies
        available = available_memory() or float("inf")  # unknown: in memory, as before this choice existed
        fits = need <= memory_fraction * available
        numbers = (
            f"caching {round(cache_rate * len(data))} of {len(data)} cases in memory needs ~{need / GIB:.2f} GiB"
            + (f" ({copies} processes)" if copies > 1 else "")
            + f", {'within' if fits else 'over'} {memory_fraction:.0%} of the {available / GIB:.1f} GiB available"
        )
        if dataset_type == "memory" and not fits:
            fix = "use --dataset_type disk (or auto) or a lower --cache_rate"
            raise UsageError(f"--dataset_type memory: {numbers}; {fix}")
        logger.info(f"dataset_type {dataset_type}: {numbers}: {'in memory' if fits else 'on disk'}")
        if fits:
            return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers, copy_cache=copy_cache)
    folder = Path(cache_dir) if cache_dir else Path(ckpt_dir) / "cache"
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--cache_dir {folder} is a file, not a folder: name a folder (created if missing)")
    dataset = DiskCacheDataset(data, transform, folder, num_workers)
    built = dataset.fill(*_rank())
    free = shutil.disk_usage(folder).free / GIB
    logger.info(f"disk cache {folder}: {len(data)} cases, {built} pre-processed now, {free:.1f} GiB free")
    return dataset
