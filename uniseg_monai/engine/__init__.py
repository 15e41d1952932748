"""What MONAI engines call: inferers, losses, handlers, training checkpoints and resume, guards, precision,
evaluation, and the wiring of bundle runs."""
