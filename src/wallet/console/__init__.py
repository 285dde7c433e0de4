"""The operator console (/console): server-rendered pages over the same operations as the API."""
