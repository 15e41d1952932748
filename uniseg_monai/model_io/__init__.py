"""Model files: reading and writing weights (weights-only, official UniSeg containers, self-describing files) and
the upstream -> downstream transfer."""
