"""Segment names, colours and DICOM terminology entries for the classes a model knows.

Every entry names a context that Slicer ships (Modules/Loadable/Terminologies/Resources, unchanged from
Slicer 5.6 to 5.12) and a category and type that this context holds: Neoplasm is in the DICOM master
list, not in Slicer's General Anatomy list, and a generic "Lesion" code is in neither, so a lesion is
typed as the master list's "Mass" (Testing/test_terminology.py checks each code against the context).
"""

from dataclasses import dataclass
from typing import Tuple

CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
REGION_BRAIN = ("SCT", "12738006", "Brain")


@dataclass(frozen=True)
class SegmentStyle:
    name: str
    color: Tuple[float, float, float]
    category: Tuple[str, str, str]
    type: Tuple[str, str, str]
    region: Tuple[str, str, str] = REGION_BRAIN

    def terminology(self) -> dict:
        """The dict slicerio writes as a Slicer ``TerminologyEntry`` tag."""
        return {
            "contextName": CONTEXT,
            "category": list(self.category),
            "type": list(self.type),
            "anatomicContextName": ANATOMIC_CONTEXT,
            "anatomicRegion": list(self.region),
        }

    def terminology_string(self) -> str:
        """Slicer's serialised terminology entry (category~type~modifier~context~region~modifier)."""
        t = self.terminology()
        return "~".join([t["contextName"], "^".join(t["category"]), "^".join(t["type"]), "^^",
                         t["anatomicContextName"], "^".join(t["anatomicRegion"]), "^^"])


ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")
STYLES = {
    "tumour": SegmentStyle("Tumour", (0.89, 0.35, 0.21), ALTERED, ("SCT", "108369006", "Neoplasm")),
    "lesion": SegmentStyle("Lesion", (0.96, 0.65, 0.20), ALTERED, ("SCT", "4147007", "Mass")),
    "oedema": SegmentStyle("Oedema", (0.55, 0.80, 0.35), ALTERED, ("SCT", "79654002", "Edema")),
}


def segment_style(class_name: str) -> SegmentStyle:
    """The style of a known class name (any spelling of tumour/tumor, lesion, oedema/edema), else a lesion."""
    key = class_name.strip().lower()
    key = {"tumor": "tumour", "edema": "oedema"}.get(key, key)
    style = STYLES.get(key, STYLES["lesion"])
    return style if key in STYLES else SegmentStyle(class_name, style.color, style.category, style.type)
