"""The web adapter: FastAPI app, DICOMweb, WADO-URI, pages and their JSON API."""
