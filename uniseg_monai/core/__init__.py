"""The bottom layer: user errors, atomic writes, run-folder names and folder locks (imports no other layer)."""
