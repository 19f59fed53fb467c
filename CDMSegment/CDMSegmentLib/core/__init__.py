"""The inference core: noise schedule, conditional UNet, the CDM heatmap (Algorithm 1), the method registry,
model files and their download, the volume runner, slice geometry and thresholds. It never imports
training, evaluation, the command line or Slicer; the baselines are imported lazily by the method registry."""
