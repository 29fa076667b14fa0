"""Datasets as uint8 tensors (sample, CIFAR, ImageFolder) and a deterministic on-device loader."""

from surgeon.data.loader import Loader
from surgeon.data.sources import DATA_SOURCES, ImageData, load_data

__all__ = ["DATA_SOURCES", "ImageData", "Loader", "load_data"]
