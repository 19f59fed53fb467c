"""The Slicer adapters: the only code importing slicer or vtk (never qt or ctk)."""
