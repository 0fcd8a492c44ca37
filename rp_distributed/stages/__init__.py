"""The three Ray stages, each a thin callable over the work of one image (detection, anonymization, merging)."""
