"""Datasets (CUB, ImageFolder, manifests), loading and preprocessing."""

from finegrain.data.datasets import DatasetIndex, Sample, load_dataset, save_split
from finegrain.data.loading import ImageDataset, find_bad_images, open_image
from finegrain.data.transforms import Preprocess, eval_transform, train_transform

__all__ = [
    "DatasetIndex",
    "ImageDataset",
    "Preprocess",
    "Sample",
    "eval_transform",
    "find_bad_images",
    "load_dataset",
    "open_image",
    "save_split",
    "train_transform",
]
