"""Render a CDMSegment result with Slicer's own views and save it as one PNG.

Uses trame-slicer (PyPI), which runs Slicer's slice views, 3D view and displayable
managers from slicer-core without the Qt application, rendering offscreen (EGL or X).
The scene is set up as the CDMSegment module leaves it after a run: the input volume in
the slice background, the heatmap in the foreground with the PET-Heat colours at opacity
0.4, the segmentation as outline and light fill in 2D and as a closed surface in 3D.
Slice views go through the centre of the first segment.

Usage:
    python render_screenshot.py SAMPLE HEATMAP SEG OUT.png [--size 1600x900] [--verbose]

Dependencies: trame-slicer, slicer-core, vtk, numpy, Pillow, and SimpleITK and scipy for CDMSegmentLib.slicer_adapters.mrml,
whose display rules (heat colours, window, opacity) it applies.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from slicer import vtkMRMLAbstractViewNode
from trame_slicer.core import SlicerApp
from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkCommonCore import vtkObject
from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))
from CDMSegmentLib.slicer_adapters import mrml  # noqa: E402  (the module's own display rules)

SLICE_ZOOM = 1.15  # slice views: zoom in a little on the anatomy

# (layout definition, tile label, label colour as in Slicer's view controllers)
VIEWS = [
    (ViewLayoutDefinition.axial_view(), "Axial", (243, 74, 51)),
    (ViewLayoutDefinition.coronal_view(), "Coronal", (109, 173, 74)),
    (ViewLayoutDefinition.sagittal_view(), "Sagittal", (239, 214, 77)),
    (ViewLayoutDefinition.threed_view(), "3D", (116, 131, 233)),
]
# Per slice orientation: the RAS axis the slice moves along and its (positive, negative) direction letters
SLICE_AXIS = {"Axial": (2, "SI"), "Coronal": (1, "AP"), "Sagittal": (0, "RL")}


def setup_scene(app, sample_path, heatmap_path, seg_path):
    """Load the three files and display them as the CDMSegment module does."""
    volume = app.io_manager.load_volumes(sample_path)[0]
    heatmap = app.io_manager.load_volumes(heatmap_path)[0]
    segmentation = app.io_manager.load_segmentation(seg_path)
    if segmentation is None:
        raise SystemExit(f"cannot read segmentation {seg_path}")

    mrml.show_as_heatmap(heatmap)

    # Segmentation: outline and light fill in 2D, closed surface in 3D.
    segmentation.CreateClosedSurfaceRepresentation()
    seg_display = segmentation.GetDisplayNode()
    seg_display.SetVisibility2DOutline(True)
    seg_display.SetVisibility2DFill(True)
    seg_display.SetOpacity2DFill(0.15)
    seg_display.SetOpacity2DOutline(1.0)
    seg_display.SetSliceIntersectionThickness(2)
    seg_display.SetVisibility3D(True)
    return volume, heatmap, segmentation


def lesion_center(segmentation):
    """RAS centre of the first segment (the lesion)."""
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    return segmentation.GetSegmentCenterRAS(segment_id)


def draw_slice_image_first(view):
    """Make the slice image the first prop its renderer draws.

    trame-slicer adds the slice image actor after the displayable managers' actors. VTK
    then draws the segment fill (a translucent 2D image) before the slice image, which it
    hides, so the fill blends over black. Re-adding background actors first fixes it.
    """
    renderer = view.first_renderer()
    props = list(renderer.GetViewProps())
    renderer.RemoveAllViewProps()

    def is_background(prop):
        return prop.IsA("vtkActor2D") and prop.GetProperty().GetDisplayLocation() == 0  # VTK_BACKGROUND_LOCATION

    for prop in sorted(props, key=lambda prop: not is_background(prop)):  # stable: keeps the others' order
        renderer.AddViewProp(prop)


def slice_label(view, name):
    """'Axial  S 42.5 mm': the view name and the slice position along its axis, in patient terms."""
    axis, letters = SLICE_AXIS[name]
    position = view.get_view_node().GetSliceToRAS().GetElement(axis, 3)
    return f"{name}  {letters[position < 0]} {abs(position):.1f} mm"


def grab(view):
    """The view's render window as an (H, W, 3) uint8 array."""
    view.render_window().Render()
    grabber = vtkWindowToImageFilter()
    grabber.SetInput(view.render_window())
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)
    return np.flipud(pixels).copy()


def label_tile(tile, text, color):
    """Draw a Slicer-like view label (coloured bar, name) on top of a tile."""
    image = Image.fromarray(tile)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=18)
    draw.rectangle([0, 0, image.width, 4], fill=color)
    draw.rectangle([8, 10, 18 + draw.textlength(text, font=font), 36], fill=(0, 0, 0))
    draw.text((13, 12), text, fill=color, font=font)
    return np.asarray(image)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sample", help="input volume (the sample FLAIR)")
    parser.add_argument("heatmap", help="CDMSegment heatmap (<stem>_heatmap.nrrd)")
    parser.add_argument("seg", help="CDMSegment segmentation (<stem>.seg.nrrd)")
    parser.add_argument("out", help="output PNG")
    parser.add_argument("--size", default="1600x900", help="image size WxH, 2x2 tiles (default 1600x900)")
    parser.add_argument("--verbose", action="store_true", help="show VTK warnings and errors")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    tile_w, tile_h = width // 2, height // 2
    start = time.perf_counter()

    app = SlicerApp()
    if not args.verbose:
        # Rendering the 3D view prints vtkImageExtractComponents / vtkImageMapToColors errors
        # that leave the image unchanged; --verbose shows them.
        vtkObject.GlobalWarningDisplayOff()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    views = [app.view_manager.create_view(definition) for definition, _, _ in VIEWS]
    app.view_manager.set_current_view_ids([definition.singleton_tag for definition, _, _ in VIEWS])
    for view in views:
        view.set_render_blocked(True)  # render once at the end, not on every scene change
        view.render_window().SetSize(tile_w, tile_h)
        view.update_size(tile_w, tile_h)
        view.set_orientation_marker(vtkMRMLAbstractViewNode.OrientationMarkerTypeCube,
                                    vtkMRMLAbstractViewNode.OrientationMarkerSizeSmall)

    volume, heatmap, segmentation = setup_scene(app, args.sample, args.heatmap, args.seg)
    center = lesion_center(segmentation)

    slice_views, threed_view = views[:3], views[3]
    for view in slice_views:
        view.set_background_volume_id(volume.GetID())
        view.set_foreground_volume_id(heatmap.GetID())
        view.set_foreground_opacity(mrml.HEATMAP_OPACITY)
        view.fit_view_to_content()
        view.zoom(1 - 1 / SLICE_ZOOM)
        view.get_view_node().JumpSliceByOffsetting(*center)
        draw_slice_image_first(view)

    # 3D: the lesion surface over the axial slice, seen from the front, right and above.
    slice_views[0].set_visible_in_3d(True)
    threed_view.fit_view_to_content()  # anterior view, centred on the visible content
    camera = threed_view.get_camera_node()
    camera.GetCamera().Azimuth(-40)
    camera.GetCamera().Elevation(40)
    camera.GetCamera().OrthogonalizeViewUp()
    camera.GetCamera().Dolly(1.5)
    camera.ResetClippingRange()

    for view in views:
        view.set_render_blocked(False)
    labels = [slice_label(view, name) for view, (_, name, _) in zip(slice_views, VIEWS)] + ["3D"]
    tiles = [label_tile(grab(view), text, color) for view, text, (_, _, color) in zip(views, labels, VIEWS)]
    canvas = np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])])
    Image.fromarray(canvas).save(args.out, optimize=True)
    print(f"wrote {args.out} ({canvas.shape[1]}x{canvas.shape[0]}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
