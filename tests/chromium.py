"""Debian's Chromium (``apt-get install chromium``), launched by Playwright the same way for the
browser tests and the viewer benchmark."""

CHROMIUM = "/usr/bin/chromium"
# No sandbox (CI runs as root in a container), no GPU, and nothing that reaches the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
