"""What the ``uniseg`` commands do: predict, add-task, export, report, demo, ablation, metadata, weights, and finding
and opening bundles."""
