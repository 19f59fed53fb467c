"""The ``cdmsegment`` command line and its file I/O: reading a case, writing the heatmap and segmentation."""
