"""A CT phantom with known Hounsfield units: air, soft tissue, two lungs and a spine.

Regions have exact values (no noise) so that an ROI drawn in the browser must read the same
mean and an SD of 0, and a lung window shows recognisable anatomy in the README screenshot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from tests.synthetic import make_instance

AIR, TISSUE, LUNG, BONE = -1000, 40, -850, 700
SIZE = 256
SPACING = 0.8  # mm per pixel, both directions


def slice_hu(number: int, size: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    s = size / 256
    hu = np.full((size, size), AIR, dtype=np.int16)
    body = ((x - c) / (110 * s)) ** 2 + ((y - c) / (80 * s)) ** 2 <= 1
    hu[body] = TISSUE
    shrink = 1 - 0.3 * abs(number - 15) / 15  # lungs change size along the stack
    for side in (-1, 1):
        lung = ((x - c - side * 50 * s) / (35 * s * shrink)) ** 2 + ((y - c + 5 * s) / (50 * s * shrink)) ** 2 <= 1
        hu[lung] = LUNG
    spine = (x - c) ** 2 + (y - c - 55 * s) ** 2 <= (14 * s) ** 2
    hu[spine] = BONE
    return hu


def write_phantom(folder: Path, count: int = 30, size: int = SIZE, **kwargs: object) -> list[Path]:
    """``count`` slices of the phantom as CT files (RescaleIntercept -1024, stored = HU + 1024)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for n in range(1, count + 1):
        ds = make_instance(study_uid=study_uid, series_uid=series_uid, number=n, size=size, **kwargs)  # type: ignore[arg-type]
        ds.PixelSpacing = [SPACING, SPACING]
        ds.PixelData = (slice_hu(n, size) + 1024).astype(np.int16).tobytes()
        path = folder / f"{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
