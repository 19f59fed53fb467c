"""Training the diffusion model and the noise-aware classifier, calibrating defaults, exporting model files."""
