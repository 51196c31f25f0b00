"""DICOM networking: the pynetdicom application entity and its service handlers."""
