import pytest

from CDMSegmentLib.core.terminology import segment_style


@pytest.mark.parametrize("class_name, name, snomed_type", [
    ("tumour", "Tumour", "Neoplasm"), ("Tumor", "Tumour", "Neoplasm"), ("oedema", "Oedema", "Edema"),
    ("edema", "Oedema", "Edema"), (" Lesion ", "Lesion", "Lesion"), ("necrosis", "necrosis", "Lesion")])
def test_every_spelling_of_a_known_class_gets_its_style_and_others_a_lesion_style(class_name, name, snomed_type):
    style = segment_style(class_name)
    assert style.name == name
    assert style.type[2] == snomed_type
