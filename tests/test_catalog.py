import importlib.util
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from portraits.catalog import (
    CATEGORIES,
    Catalog,
    CatalogError,
    fit_output_size,
    load_catalog,
    template_to_json,
)

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
ID_BACKGROUND_RGB = {"white": (255, 255, 255), "blue": (67, 142, 219), "red": (255, 0, 0)}
SAMPLE_ID = "urban_neon_night"


def _load_make_previews():
    spec = importlib.util.spec_from_file_location("make_previews", TEMPLATES_DIR / "make_previews.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(TEMPLATES_DIR)


# --- the real catalog -------------------------------------------------------------------------

def test_real_catalog_is_large_and_covers_categories(catalog):
    assert len(catalog) >= 36
    assert len(catalog.categories()) >= 8
    for required in ("ancient_costume", "urban", "id_photo", "casual", "business", "wedding", "campus", "festive"):
        assert required in catalog.categories()


def test_every_category_offers_balanced_female_and_male_templates(catalog):
    for category in catalog.categories():
        counts = Counter(t.gender for t in catalog.filter(category=category))
        assert counts["female"] >= 1 and counts["male"] >= 1, category
        assert abs(counts["female"] - counts["male"]) <= 1, (category, counts)
    overall = Counter(t.gender for t in catalog)
    assert abs(overall["female"] - overall["male"]) <= 2


def test_every_prompt_has_the_subject_slot_and_prompt_for_fills_it(catalog):
    for template in catalog:
        assert "{subject}" in template.prompt, template.id
        filled = template.prompt_for("sks man")
        assert "{subject}" not in filled and "sks man" in filled


def test_template_values_are_within_range(catalog):
    for t in catalog:
        assert 1 <= t.steps <= 150 and 0 <= t.guidance <= 30
        assert t.width % 8 == 0 and t.height % 8 == 0
        assert 1 <= t.images_to_keep <= t.candidates <= 16
        assert t.caption_zh.strip()


def test_previews_exist_and_decode(catalog):
    sizes = set()
    for template in catalog:
        path = catalog.preview_path(template.id)
        with Image.open(path) as image:
            image.load()
            sizes.add(image.size)
    assert sizes == {(384, 512)}


def test_id_photos_are_inpainting_templates_with_standard_sizes(catalog):
    id_photos = catalog.filter(category="id_photo")
    assert {t.background for t in id_photos} == {"white", "blue", "red"}
    assert {t.output_size for t in id_photos} == {(295, 413), (413, 579)}
    for t in id_photos:
        out_w, out_h = t.output_size
        assert abs(t.width / t.height - out_w / out_h) < 0.01, t.id
        assert t.width >= out_w and t.height >= out_h
        with Image.open(catalog.asset_path(t.init_image)) as init:
            init = init.convert("RGB")
        with Image.open(catalog.asset_path(t.mask)) as mask:
            mask = mask.convert("L")
        assert init.size == mask.size == (t.width, t.height)
        assert init.getpixel((2, 2)) == ID_BACKGROUND_RGB[t.background]
        centre_of_face = (t.width // 2, t.height // 3)
        assert init.getpixel(centre_of_face) != ID_BACKGROUND_RGB[t.background]
        assert mask.getpixel(centre_of_face) == 255, "the person region is regenerated"
        assert mask.getpixel((2, 2)) == 0, "the background is kept"
        assert {value for _, value in mask.getcolors()} <= {0, 255}


def test_non_id_templates_have_no_background_or_mask(catalog):
    for t in catalog:
        if t.category != "id_photo":
            assert t.background is None and t.mask is None and t.init_image is None


def test_fit_output_size_crops_to_the_id_photo_size(catalog):
    t = catalog.get("id_photo_one_inch_blue_m")
    rendered = Image.new("RGB", (t.width, t.height), (67, 142, 219))
    assert fit_output_size(rendered, t.output_size).size == (295, 413)
    assert fit_output_size(Image.new("RGB", (1000, 300)), (413, 579)).size == (413, 579)


def test_lookup_filter_and_json(catalog):
    assert catalog.get("no_such_template") is None
    template = catalog.get(SAMPLE_ID)
    assert template.category == "urban"
    males = catalog.filter(gender="male")
    assert males and all(t.gender == "male" for t in males)
    urban_female = catalog.filter(category="urban", gender="female")
    assert urban_female == catalog.filter(category="urban", gender="female")  # stable order
    assert all(t.category == "urban" and t.gender == "female" for t in urban_female)
    assert catalog.categories()[0] == "ancient_costume"
    assert set(catalog.categories()) <= set(CATEGORIES)
    assert template_to_json(template) == {
        "id": SAMPLE_ID, "name": {"zh": template.name.zh, "en": template.name.en},
        "category": "urban", "gender": template.gender,
    }
    assert template.name["zh"] == template.name.zh
    json.dumps(template_to_json(template))
    with pytest.raises(KeyError):
        catalog.preview_path("no_such_template")
    with pytest.raises(ValueError):
        catalog.asset_path("../../etc/passwd")


def test_make_previews_is_deterministic_and_matches_the_shipped_assets(tmp_path):
    make_previews = _load_make_previews()
    first = make_previews.generate(TEMPLATES_DIR, tmp_path / "a")
    make_previews.generate(TEMPLATES_DIR, tmp_path / "b")
    assert first
    for path in first:
        rel = path.relative_to(tmp_path / "a")
        assert path.read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
        if rel.parts[0] in ("masks", "init"):
            # No text in these, so they are byte-identical to the shipped files on any machine.
            assert path.read_bytes() == (TEMPLATES_DIR / rel).read_bytes(), rel
    shipped_previews = {p.name for p in (TEMPLATES_DIR / "previews").glob("*.png")}
    assert shipped_previews == {p.name for p in (tmp_path / "a" / "previews").glob("*.png")}


# --- broken catalogs --------------------------------------------------------------------------

@pytest.fixture
def catalog_copy(tmp_path) -> Path:
    copy = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__", "*.md"))
    return copy


def _edit(directory: Path, template_id: str, change) -> None:
    path = directory / f"{template_id}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _expect_error(directory: Path, file_name: str, field: str | None) -> CatalogError:
    with pytest.raises(CatalogError) as caught:
        load_catalog(directory)
    error = caught.value
    assert error.file == f"templates/{file_name}"
    assert error.field == field
    assert f"templates/{file_name}" in str(error)
    if field:
        assert f"field '{field}'" in str(error)
    return error


def test_copied_catalog_loads(catalog_copy):
    assert len(load_catalog(catalog_copy)) == len(load_catalog(TEMPLATES_DIR))


def test_bad_json_is_refused(catalog_copy):
    (catalog_copy / f"{SAMPLE_ID}.json").write_text('{"id": "urban_neon_night",', encoding="utf-8")
    error = _expect_error(catalog_copy, f"{SAMPLE_ID}.json", None)
    assert "invalid JSON" in str(error)


def test_non_object_json_is_refused(catalog_copy):
    (catalog_copy / f"{SAMPLE_ID}.json").write_text("[1, 2]", encoding="utf-8")
    _expect_error(catalog_copy, f"{SAMPLE_ID}.json", None)


@pytest.mark.parametrize(
    ("field", "change", "words"),
    [
        ("steps", lambda d: d.pop("steps"), "missing"),
        ("mood", lambda d: d.update(mood="happy"), "unknown field"),
        ("steps", lambda d: d.update(steps="30"), "integer from 1 to 150"),
        ("steps", lambda d: d.update(steps=True), "integer from 1 to 150"),
        ("steps", lambda d: d.update(steps=0), "integer from 1 to 150"),
        ("steps", lambda d: d.update(steps=151), "integer from 1 to 150"),
        ("guidance", lambda d: d.update(guidance=31), "number from 0 to 30"),
        ("width", lambda d: d.update(width=513), "multiple of 8"),
        ("height", lambda d: d.update(height=128), "multiple of 8"),
        ("identity_strength", lambda d: d.update(identity_strength=2.5), "number from 0 to 2"),
        ("name", lambda d: d.update(name="Neon"), "'zh' and 'en'"),
        ("name", lambda d: d.update(name={"zh": "霓虹", "en": ""}), "non-empty"),
        ("category", lambda d: d.update(category="space"), "must be one of"),
        ("gender", lambda d: d.update(gender="other"), "female, male"),
        ("prompt", lambda d: d.update(prompt="portrait photo of a person, neon"), "{subject}"),
        ("prompt", lambda d: d.update(prompt=["{subject}"]), "string"),
        ("id", lambda d: d.update(id="Urban-Neon"), "[a-z0-9_]"),
        ("id", lambda d: d.update(id="urban_other"), "file name"),
        ("candidates", lambda d: d.update(candidates=2, images_to_keep=3), "at least images_to_keep"),
        ("candidates", lambda d: d.update(candidates=17), "integer from 1 to 16"),
        ("images_to_keep", lambda d: d.update(images_to_keep=0), "integer from 1 to 16"),
        ("preview", lambda d: d.update(preview="previews/missing.png"), "file not found"),
        ("preview", lambda d: d.update(preview="../outside.png"), "inside the templates directory"),
        ("style_lora", lambda d: d.update(style_lora="styles/missing.safetensors"), "file not found"),
        ("mask", lambda d: d.update(init_image="init/id_photo_one_inch_white.png", width=512, height=720),
         "together"),
        ("background", lambda d: d.update(background="blue"), "null outside"),
        ("caption_zh", lambda d: d.update(caption_zh="  "), "not be empty"),
        ("output_size", lambda d: d.update(output_size=[295]), "[width, height]"),
    ],
)
def test_invalid_field_is_refused_naming_file_and_field(catalog_copy, field, change, words):
    _edit(catalog_copy, SAMPLE_ID, change)
    error = _expect_error(catalog_copy, f"{SAMPLE_ID}.json", field)
    assert words in str(error)


@pytest.mark.parametrize(
    ("field", "change", "words"),
    [
        ("background", lambda d: d.update(background="green"), "white, blue, red"),
        ("output_size", lambda d: d.pop("output_size"), "required"),
        ("mask", lambda d: d.update(mask="masks/missing.png"), "file not found"),
        ("mask", lambda d: d.update(mask="masks/id_photo_two_inch_person.png"), "must match the render size"),
        ("mask", lambda d: d.update(mask=None, init_image=None), "required"),
    ],
)
def test_invalid_id_photo_is_refused(catalog_copy, field, change, words):
    _edit(catalog_copy, "id_photo_one_inch_blue_f", change)
    error = _expect_error(catalog_copy, "id_photo_one_inch_blue_f.json", field)
    assert words in str(error)


def test_album_templates_are_apart_from_the_one_person_catalog(catalog):
    couples, families = catalog.album_templates(2), catalog.album_templates(3)
    assert len(couples) >= 3 and len(families) >= 2
    assert {t.category for t in couples} == {"couple"} and {t.category for t in families} == {"family"}
    assert all(t.people == len(t.face_regions) and t.gender == "any" for t in couples + families)
    listed = catalog.filter()
    assert listed and all(t.people == 1 for t in listed)
    assert not {"couple", "family"} & set(catalog.categories())
    assert catalog.album_templates(1) == []


ALBUM_ID = "couple_seaside_sunset"


@pytest.mark.parametrize(
    ("template_id", "change", "words"),
    [
        (ALBUM_ID, lambda d: d.pop("face_regions"), "needs 2 boxes"),
        (ALBUM_ID, lambda d: d.update(face_regions=[[150, 72, 330, 312]]), "needs 2 boxes"),
        (ALBUM_ID, lambda d: d.update(face_regions=[[150, 72, 330, 312], [300, 72, 480, 312]]),
         "without overlapping"),
        (ALBUM_ID, lambda d: d.update(face_regions=[[150, 72, 330, 312], [438, 72, 800, 312]]), "inside 768x512"),
        (ALBUM_ID, lambda d: d.update(face_regions=[[150, 72, 200, 312], [438, 72, 618, 312]]), "64 px"),
        (ALBUM_ID, lambda d: d.update(face_regions=[[150, 72, 330, True], [438, 72, 618, 312]]), "[x0, y0, x1, y1]"),
        (SAMPLE_ID, lambda d: d.update(face_regions=[[0, 0, 100, 100]]), "only album templates"),
    ],
)
def test_invalid_face_regions_are_refused(catalog_copy, template_id, change, words):
    _edit(catalog_copy, template_id, change)
    error = _expect_error(catalog_copy, f"{template_id}.json", "face_regions")
    assert words in str(error)


def test_an_album_template_has_no_gender_of_its_own(catalog_copy):
    _edit(catalog_copy, ALBUM_ID, lambda d: d.update(gender="female"))
    assert "must be one of any" in str(_expect_error(catalog_copy, f"{ALBUM_ID}.json", "gender"))


def test_duplicate_id_is_refused(catalog_copy):
    # The copy sorts first, so the original is the second file seen with this id.
    shutil.copy(catalog_copy / "ancient_costume_scholar.json", catalog_copy / "aaa_copy.json")
    error = _expect_error(catalog_copy, "ancient_costume_scholar.json", "id")
    assert "duplicate id 'ancient_costume_scholar'" in str(error)
    assert "templates/aaa_copy.json" in str(error)


def test_category_with_one_gender_only_is_refused(catalog_copy):
    for template_path in catalog_copy.glob("wedding_*.json"):
        data = json.loads(template_path.read_text(encoding="utf-8"))
        if data["gender"] == "male":
            template_path.unlink()
    error = _expect_error(catalog_copy, "wedding_white_gown.json", "gender")
    assert "'wedding' has no 'male' template" in str(error)


def test_empty_directory_is_refused(tmp_path):
    empty = tmp_path / "templates"
    empty.mkdir()
    with pytest.raises(CatalogError):
        load_catalog(empty)


# --- start-up and the HTTP catalog ------------------------------------------------------------

def test_a_broken_template_stops_service_start_up_naming_file_and_field(catalog_copy, monkeypatch, tmp_path,
                                                                         simulator, http_server, redis_server):
    from miniapp_api import create_app
    from portraits import services as services_module
    from portraits.store.redis_client import socket_path
    from conftest import make_settings

    _edit(catalog_copy, SAMPLE_ID, lambda d: d.update(steps=0))
    monkeypatch.setattr(services_module, "TEMPLATES_DIR", catalog_copy)
    settings = make_settings(tmp_path / "instance", simulator, http_server, mongo_db="broken_catalog",
                             redis_url=f"unix://{socket_path(redis_server)}")
    with pytest.raises(CatalogError) as caught:
        create_app(settings)
    assert str(caught.value) == f"templates/{SAMPLE_ID}.json: field 'steps': must be an integer from 1 to 150"


def test_templates_api_filters_by_category_and_gender(login, services):
    api = login("alice", consent=False)
    everything = api.get("/api/v1/templates").get_json()
    assert len(everything) == len(services.catalog.filter())  # album templates are listed with albums
    for category in services.catalog.categories():
        for gender in ("female", "male"):
            listed = api.get(f"/api/v1/templates?category={category}&gender={gender}").get_json()
            assert listed and all(t["category"] == category and t["gender"] == gender for t in listed)
            assert [t["id"] for t in listed] == [t.id for t in services.catalog.filter(category, gender)]
    males = api.get("/api/v1/templates?gender=male").get_json()
    assert {t["gender"] for t in males} == {"male"}
    assert set(everything[0]) == {"id", "name", "category", "gender", "preview_url"}


def test_templates_api_refuses_unknown_filters_and_needs_login(login, client):
    api = login("alice", consent=False)
    unknown = api.get("/api/v1/templates?category=space")
    assert unknown.status_code == 400 and unknown.get_json()["error"]["code"] == "unknown_category"
    bad_gender = api.get("/api/v1/templates?gender=other")
    assert bad_gender.status_code == 400 and bad_gender.get_json()["error"]["code"] == "invalid_fields"
    assert client.get("/api/v1/templates").status_code == 401


def test_previews_are_served_as_png_without_a_token(login, client, services):
    # Mini-program <image> tags cannot send a bearer header, so previews are public (they show no user data).
    listed = login("alice", consent=False).get("/api/v1/templates?category=wedding").get_json()
    for template in listed:
        response = client.get(template["preview_url"])
        assert response.status_code == 200 and response.mimetype == "image/png"
        with Image.open(__import__("io").BytesIO(response.data)) as image:
            assert image.format == "PNG" and image.size == (384, 512)
    missing = client.get("/api/v1/templates/no_such_template/preview")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "template_not_found"
