"""Datasets: readers for the accepted formats, the leave-one-out split and the demo generator."""

from mp4sr_train.data.demo import default_demo_dir, demo_features, generate_demo
from mp4sr_train.data.preprocess import hold_out_items, load_or_preprocess, preprocess
from mp4sr_train.data.readers import detect, read_dataset
from mp4sr_train.data.types import ItemInfo, RawData, Split, SplitData

__all__ = [
    "ItemInfo",
    "RawData",
    "Split",
    "SplitData",
    "default_demo_dir",
    "demo_features",
    "detect",
    "generate_demo",
    "hold_out_items",
    "load_or_preprocess",
    "preprocess",
    "read_dataset",
]
