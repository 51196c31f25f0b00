"""Provisioning: turns a fresh host into an unattended macpacs server (``macpacs install``)."""
