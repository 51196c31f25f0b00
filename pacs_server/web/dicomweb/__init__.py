"""DICOMweb under ``/dicom-web``: QIDO-RS (search), WADO-RS (retrieve), STOW-RS (store)."""

from fastapi import APIRouter

from . import pixeldata, qido, stow, wado

router = APIRouter()
router.include_router(qido.router)
router.include_router(wado.router)
router.include_router(pixeldata.router)
router.include_router(stow.router)

__all__ = ["router"]
