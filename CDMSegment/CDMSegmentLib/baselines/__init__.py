"""The methods the paper compares against, run in the same harness: the CAM family (grad-cam) and CG-Diff."""
