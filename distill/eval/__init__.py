"""FID / KID / precision-recall through torch-fidelity, offline feature extractors, reports."""
