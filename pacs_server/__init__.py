"""The macpacs archive: DICOM listener, index, file store, web and XML-RPC in one process."""
