"""Datalists, data checks, task-aware transforms, caching and its memory estimate, task-uniform sampling and
synthetic phantoms."""

from uniseg_monai.data.datalist import DatalistError, inference_items, load_items, read_datalist, task_items
from uniseg_monai.data.sampling import TaskUniformSampler

__all__ = ["DatalistError", "TaskUniformSampler", "inference_items", "load_items", "read_datalist", "task_items"]
