import pytest

from CDMSegmentLib.core.terminology import ANATOMIC_CONTEXT, CONTEXT, STYLES, segment_style

ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")
# The types of the category "Morphologically Altered Structure" in the terminology contexts Slicer ships
# (Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-*.json), copied from Slicer's
# source: the same at v5.6.2, v5.8.1, v5.10.0, v5.12.3 and main.
SLICER_CONTEXTS = {
    "Segmentation category and type - DICOM master list": {ALTERED: {
        ("SCT", "4147007", "Mass"), ("SCT", "27925004", "Nodule"), ("SCT", "367643001", "Cyst"),
        ("SCT", "75753009", "Blood clot"), ("SCT", "55584005", "Embolus"), ("SCT", "79654002", "Edema"),
        ("SCT", "50960005", "Hemorrhage"), ("SCT", "23583003", "Inflammation"), ("SCT", "44132006", "Abscess"),
        ("SCT", "6574001", "Necrosis"), ("SCT", "86049000", "Neoplasm, Primary"),
        ("SCT", "14799000", "Neoplasm, Secondary"), ("SCT", "108369006", "Neoplasm")}},
    "Segmentation category and type - 3D Slicer General Anatomy list": {ALTERED: {
        ("SCT", "79654002", "Edema"), ("SCT", "4147007", "Mass"), ("SCT", "6574001", "Necrosis")}},
}
# AnatomicRegionAndModifier-DICOM-Master.json: the one region used.
SLICER_ANATOMIC_CONTEXTS = {"Anatomic codes - DICOM master list": {("SCT", "12738006", "Brain")}}


@pytest.mark.parametrize("class_name, name, snomed_type", [
    ("tumour", "Tumour", "Neoplasm"), ("Tumor", "Tumour", "Neoplasm"), ("oedema", "Oedema", "Edema"),
    ("edema", "Oedema", "Edema"), (" Lesion ", "Lesion", "Mass"), ("necrosis", "necrosis", "Mass")])
def test_every_spelling_of_a_known_class_gets_its_style_and_others_a_lesion_style(class_name, name, snomed_type):
    style = segment_style(class_name)
    assert style.name == name
    assert style.type[2] == snomed_type


@pytest.mark.parametrize("key", sorted(STYLES) + ["an unknown class"])
def test_each_entry_exists_in_the_slicer_context_it_names(key):
    style = segment_style(key)
    entry = style.terminology()
    assert entry["contextName"] == CONTEXT and entry["anatomicContextName"] == ANATOMIC_CONTEXT
    categories = SLICER_CONTEXTS[CONTEXT]
    assert style.category in categories
    assert style.type in categories[style.category], f"{style.type} is not a type of {style.category} in {CONTEXT}"
    assert style.region in SLICER_ANATOMIC_CONTEXTS[ANATOMIC_CONTEXT]


def test_the_serialised_entry_is_slicers_seven_fields():
    """contextName~category~type~typeModifier~anatomicContextName~region~regionModifier (codes as scheme^value^meaning),
    as vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry writes it in Slicer 5.6 and later."""
    fields = segment_style("tumour").terminology_string().split("~")
    assert fields == [CONTEXT, "SCT^49755003^Morphologically Altered Structure", "SCT^108369006^Neoplasm", "^^",
                      ANATOMIC_CONTEXT, "SCT^12738006^Brain", "^^"]


def test_the_general_anatomy_list_lacks_neoplasm():
    """Why the entries name the DICOM master list (issue: Neoplasm was filed under the General Anatomy list)."""
    general = SLICER_CONTEXTS["Segmentation category and type - 3D Slicer General Anatomy list"][ALTERED]
    assert segment_style("tumour").type not in general
