"""Datasets (CUB, ImageFolder, manifests), loading and preprocessing."""

from finegrain.data.datasets import load_dataset, save_split
from finegrain.data.loading import IMAGE_SUFFIXES, ImageDataset, find_bad_images, list_images, open_image, open_sample
from finegrain.data.records import DatasetIndex, Sample
from finegrain.data.transforms import Preprocess, eval_transform, train_transform

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetIndex",
    "ImageDataset",
    "Preprocess",
    "Sample",
    "eval_transform",
    "find_bad_images",
    "list_images",
    "load_dataset",
    "open_image",
    "open_sample",
    "save_split",
    "train_transform",
]
