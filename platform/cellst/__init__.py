"""cellst: Ray-distributed ST++ self-training of HoVer-Net for cell instance segmentation."""

__version__ = "0.1.0"
