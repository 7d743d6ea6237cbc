"""Portrait template catalog: loads and validates templates/<id>.json files.

Every problem is reported as a CatalogError naming the file and the field, so a broken
template is caught when the service starts rather than when a user renders it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

# Category id -> display names, in the order the client shows them.
CATEGORIES: dict[str, dict[str, str]] = {
    "ancient_costume": {"zh": "古装", "en": "Ancient Costume"},
    "urban": {"zh": "都市", "en": "Urban"},
    "id_photo": {"zh": "证件照", "en": "ID Photo"},
    "casual": {"zh": "休闲", "en": "Casual"},
    "business": {"zh": "商务", "en": "Business"},
    "wedding": {"zh": "婚纱", "en": "Wedding"},
    "campus": {"zh": "校园", "en": "Campus"},
    "festive": {"zh": "节日", "en": "Festive"},
    "sports": {"zh": "运动", "en": "Sports"},
    "vintage": {"zh": "复古", "en": "Vintage"},
    # Album categories (portraits.albums): several people, each face drawn with its owner's LoRA.
    "couple": {"zh": "情侣", "en": "Couple"},
    "family": {"zh": "家庭", "en": "Family"},
}
# How many people an album category's templates show; every other category shows one.
ALBUM_CATEGORIES = {"couple": 2, "family": 3}
GENDERS = ("female", "male")
# An album template's gender: its people are whoever the album's members are.
ANY_GENDER = "any"
ID_PHOTO_CATEGORY = "id_photo"
ID_PHOTO_BACKGROUNDS = ("white", "blue", "red")
SUBJECT_SLOT = "{subject}"

_ID_PATTERN = re.compile(r"^[a-z0-9_]+$")
_REQUIRED_FIELDS = (
    "id", "name", "category", "gender", "prompt", "negative_prompt", "steps", "guidance",
    "width", "height", "identity_strength", "style_lora", "style_strength", "candidates",
    "images_to_keep", "init_image", "mask", "background", "preview", "caption_zh",
)
_OPTIONAL_FIELDS = ("output_size", "face_regions")
_ALLOWED_FIELDS = frozenset(_REQUIRED_FIELDS + _OPTIONAL_FIELDS)


class CatalogError(Exception):
    """A template file is unusable. `file` and `field` say where (field may be None)."""

    def __init__(self, file: str, field: str | None, problem: str):
        self.file = file
        self.field = field
        self.problem = problem
        where = f"{file}: field '{field}'" if field else file
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class LocalizedName:
    zh: str
    en: str

    def __getitem__(self, language: str) -> str:
        if language not in ("zh", "en"):
            raise KeyError(language)
        return getattr(self, language)

    def to_json(self) -> dict[str, str]:
        return {"zh": self.zh, "en": self.en}


@dataclass(frozen=True)
class Template:
    id: str
    name: LocalizedName
    category: str
    gender: str
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    width: int
    height: int
    identity_strength: float
    style_lora: str | None
    style_strength: float
    candidates: int
    images_to_keep: int
    init_image: str | None
    mask: str | None
    background: str | None
    preview: str
    caption_zh: str
    output_size: tuple[int, int] | None = None
    # Album templates: one box (x0, y0, x1, y1, render pixels) per person, left to right; the album's members take
    # them in the album's order (the inviter first).
    face_regions: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def is_inpainting(self) -> bool:
        return self.mask is not None

    @property
    def people(self) -> int:
        return len(self.face_regions) or 1

    def prompt_for(self, subject: str) -> str:
        # str.replace rather than str.format: prompts may legitimately contain other braces.
        return self.prompt.replace(SUBJECT_SLOT, subject)


class Catalog:
    def __init__(self, templates: dict[str, Template], root: Path):
        self.root = Path(root)
        category_rank = {name: rank for rank, name in enumerate(CATEGORIES)}
        ordered = sorted(
            templates.values(),
            key=lambda t: (category_rank.get(t.category, len(category_rank)), t.category, t.id),
        )
        self._templates = {t.id: t for t in ordered}

    def __len__(self) -> int:
        return len(self._templates)

    def __iter__(self):
        return iter(self._templates.values())

    def get(self, template_id: str) -> Template | None:
        return self._templates.get(template_id)

    def filter(self, category: str | None = None, gender: str | None = None) -> list[Template]:
        """One-person templates (what a user renders, lists and a pack spreads over)."""
        return [
            t for t in self._templates.values()
            if t.people == 1 and (category is None or t.category == category)
            and (gender is None or t.gender == gender)
        ]

    def album_templates(self, people: int) -> list[Template]:
        """The templates of albums of `people` people."""
        return [t for t in self._templates.values() if t.people == people and people > 1]

    def categories(self) -> list[str]:
        """Categories of one-person templates, in display order."""
        seen: dict[str, None] = {}
        for t in self.filter():
            seen.setdefault(t.category, None)
        return list(seen)

    def preview_path(self, template_id: str) -> Path:
        template = self._templates.get(template_id)
        if template is None:
            raise KeyError(template_id)
        return self.asset_path(template.preview)

    def asset_path(self, rel: str) -> Path:
        root = self.root.resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"asset path escapes the catalog directory: {rel!r}")
        return path


def template_to_json(t: Template) -> dict[str, Any]:
    """The public view of a template for GET /templates; the caller adds preview_url."""
    return {"id": t.id, "name": t.name.to_json(), "category": t.category, "gender": t.gender}


def fit_output_size(image: Image.Image, output_size: tuple[int, int]) -> Image.Image:
    """Centre-crop to the output aspect ratio, then resize (ID photos: 295x413, 413x579)."""
    out_w, out_h = output_size
    w, h = image.size
    if w * out_h > h * out_w:
        crop_w, crop_h = round(h * out_w / out_h), h
    else:
        crop_w, crop_h = w, round(w * out_h / out_w)
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    cropped = image.crop((left, top, left + crop_w, top + crop_h))
    return cropped.resize((out_w, out_h), Image.Resampling.LANCZOS)


def load_catalog(directory: Path) -> Catalog:
    directory = Path(directory)
    if not directory.is_dir():
        raise CatalogError(str(directory), None, "catalog directory does not exist")
    parsed: list[tuple[Path, str, dict[str, Any]]] = []
    files_by_id: dict[str, str] = {}
    # Duplicates are found on the raw ids first: a copied file that kept its id is reported
    # as a duplicate rather than as a file-name mismatch.
    for path in sorted(directory.glob("*.json")):
        label = f"{directory.name}/{path.name}"
        data = _parse(path, label)
        template_id = data.get("id")
        if isinstance(template_id, str):
            if template_id in files_by_id:
                raise CatalogError(label, "id", f"duplicate id '{template_id}' (also in {files_by_id[template_id]})")
            files_by_id[template_id] = label
        parsed.append((path, label, data))
    if not parsed:
        raise CatalogError(directory.name, None, "no template files (*.json) found")
    templates: dict[str, Template] = {}
    for path, label, data in parsed:
        template = _TemplateReader(directory, path, label, data).read()
        templates[template.id] = template
    _check_gender_coverage(templates.values(), files_by_id)
    return Catalog(templates, directory)


def _parse(path: Path, label: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CatalogError(label, None, f"not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CatalogError(label, None, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise CatalogError(label, None, "must contain a JSON object")
    return data


def _check_gender_coverage(templates: Iterable[Template], files_by_id: dict[str, str]) -> None:
    by_category: dict[str, list[Template]] = {}
    for t in templates:
        by_category.setdefault(t.category, []).append(t)
    for category, members in by_category.items():
        if category in ALBUM_CATEGORIES:
            continue
        present = {t.gender for t in members}
        for gender in GENDERS:
            if gender not in present:
                first = sorted(members, key=lambda t: t.id)[0]
                raise CatalogError(
                    files_by_id[first.id], "gender",
                    f"category '{category}' has no '{gender}' template; every category needs both genders",
                )


class _TemplateReader:
    """Validates one template file; each check raises CatalogError at the first problem."""

    def __init__(self, root: Path, path: Path, label: str, data: dict[str, Any]):
        self.root = root
        self.path = path
        self.label = label
        self.data = data

    def fail(self, field: str | None, problem: str) -> CatalogError:
        return CatalogError(self.label, field, problem)

    def read(self) -> Template:
        self._check_field_set()
        template_id = self._id()
        name = self._name()
        category = self._choice("category", tuple(CATEGORIES))
        album = category in ALBUM_CATEGORIES
        gender = self._choice("gender", (ANY_GENDER,) if album else GENDERS)
        prompt = self._text("prompt")
        if SUBJECT_SLOT not in prompt:
            raise self.fail("prompt", f"must contain the slot {SUBJECT_SLOT}")
        negative_prompt = self._text("negative_prompt", allow_empty=True)
        steps = self._integer("steps", 1, 150)
        guidance = self._number("guidance", 0, 30)
        width = self._dimension("width")
        height = self._dimension("height")
        identity_strength = self._number("identity_strength", 0, 2)
        style_lora = self._optional_asset("style_lora")
        style_strength = self._number("style_strength", 0, 2)
        candidates = self._integer("candidates", 1, 16)
        images_to_keep = self._integer("images_to_keep", 1, 16)
        if candidates < images_to_keep:
            raise self.fail("candidates", f"must be at least images_to_keep ({images_to_keep})")
        init_image = self._optional_asset("init_image", expected_size=(width, height))
        mask = self._optional_asset("mask", expected_size=(width, height))
        if (init_image is None) != (mask is None):
            field = "mask" if mask is None else "init_image"
            raise self.fail(field, "init_image and mask must be given together (inpainting) or both be null")
        background = self._background(category)
        preview = self._asset("preview")
        caption_zh = self._text("caption_zh")
        output_size = self._output_size(category)
        face_regions = self._face_regions(category, width, height)
        if category == ID_PHOTO_CATEGORY and mask is None:
            raise self.fail("mask", "ID photos are inpainted: init_image and mask are required")
        return Template(
            id=template_id, name=name, category=category, gender=gender, prompt=prompt,
            negative_prompt=negative_prompt, steps=steps, guidance=guidance, width=width, height=height,
            identity_strength=identity_strength, style_lora=style_lora, style_strength=style_strength,
            candidates=candidates, images_to_keep=images_to_keep, init_image=init_image, mask=mask,
            background=background, preview=preview, caption_zh=caption_zh, output_size=output_size,
            face_regions=face_regions,
        )

    def _check_field_set(self) -> None:
        for field in sorted(self.data):
            if field not in _ALLOWED_FIELDS:
                raise self.fail(field, "unknown field")
        for field in _REQUIRED_FIELDS:
            if field not in self.data:
                raise self.fail(field, "missing")

    def _id(self) -> str:
        value = self.data["id"]
        if not isinstance(value, str) or not _ID_PATTERN.match(value):
            raise self.fail("id", "must be a string of [a-z0-9_]")
        if value != self.path.stem:
            raise self.fail("id", f"must equal the file name stem '{self.path.stem}'")
        return value

    def _name(self) -> LocalizedName:
        value = self.data["name"]
        if not isinstance(value, dict) or set(value) != {"zh", "en"}:
            raise self.fail("name", "must be an object with exactly the keys 'zh' and 'en'")
        for language in ("zh", "en"):
            if not isinstance(value[language], str) or not value[language].strip():
                raise self.fail("name", f"'{language}' must be a non-empty string")
        return LocalizedName(zh=value["zh"], en=value["en"])

    def _choice(self, field: str, allowed: tuple[str, ...]) -> str:
        value = self.data[field]
        if not isinstance(value, str) or value not in allowed:
            raise self.fail(field, f"must be one of {', '.join(allowed)}")
        return value

    def _text(self, field: str, allow_empty: bool = False) -> str:
        value = self.data[field]
        if not isinstance(value, str):
            raise self.fail(field, "must be a string")
        if not allow_empty and not value.strip():
            raise self.fail(field, "must not be empty")
        return value

    def _integer(self, field: str, low: int, high: int) -> int:
        value = self.data[field]
        # bool is an int subclass in Python; JSON true is not a step count.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(field, f"must be an integer from {low} to {high}")
        return value

    def _number(self, field: str, low: float, high: float) -> float:
        value = self.data[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise self.fail(field, f"must be a number from {low} to {high}")
        return float(value)

    def _dimension(self, field: str) -> int:
        value = self.data[field]
        if (isinstance(value, bool) or not isinstance(value, int)
                or not 256 <= value <= 1536 or value % 8):
            raise self.fail(field, "must be a multiple of 8 from 256 to 1536")
        return value

    def _asset(self, field: str, expected_size: tuple[int, int] | None = None) -> str:
        value = self.data[field]
        if not isinstance(value, str) or not value:
            raise self.fail(field, "must be a path relative to the templates directory")
        if Path(value).is_absolute() or ".." in Path(value).parts:
            raise self.fail(field, "must be a path inside the templates directory")
        path = self.root / value
        if not path.is_file():
            raise self.fail(field, f"file not found: {value}")
        if expected_size is not None:
            try:
                with Image.open(path) as image:
                    size = image.size
            except (OSError, ValueError) as exc:
                raise self.fail(field, f"not a readable image: {value} ({exc})") from None
            if size != expected_size:
                raise self.fail(field, f"image is {size[0]}x{size[1]}, must match the render size "
                                       f"{expected_size[0]}x{expected_size[1]}")
        return value

    def _optional_asset(self, field: str, expected_size: tuple[int, int] | None = None) -> str | None:
        if self.data[field] is None:
            return None
        return self._asset(field, expected_size)

    def _background(self, category: str) -> str | None:
        value = self.data["background"]
        if category == ID_PHOTO_CATEGORY:
            if value not in ID_PHOTO_BACKGROUNDS:
                raise self.fail("background", f"ID photos need one of {', '.join(ID_PHOTO_BACKGROUNDS)}")
        elif value is not None:
            raise self.fail("background", "must be null outside the id_photo category")
        return value

    def _output_size(self, category: str) -> tuple[int, int] | None:
        if "output_size" not in self.data or self.data["output_size"] is None:
            if category == ID_PHOTO_CATEGORY:
                raise self.fail("output_size", "required for ID photos, e.g. [295, 413]")
            return None
        value = self.data["output_size"]
        if (not isinstance(value, list) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096 for v in value)):
            raise self.fail("output_size", "must be [width, height] with integers from 1 to 4096")
        return (value[0], value[1])

    def _face_regions(self, category: str, width: int, height: int) -> tuple[tuple[int, int, int, int], ...]:
        people = ALBUM_CATEGORIES.get(category)
        value = self.data.get("face_regions")
        if people is None:
            if value is not None:
                raise self.fail("face_regions", f"only album templates ({', '.join(ALBUM_CATEGORIES)}) have face "
                                                "regions")
            return ()
        if not isinstance(value, list) or len(value) != people:
            raise self.fail("face_regions", f"a {category} template needs {people} boxes [x0, y0, x1, y1]")
        boxes = []
        for box in value:
            if (not isinstance(box, list) or len(box) != 4
                    or any(isinstance(v, bool) or not isinstance(v, int) for v in box)
                    or not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height)
                    or min(box[2] - box[0], box[3] - box[1]) < 64):
                raise self.fail("face_regions", f"each box is [x0, y0, x1, y1] inside {width}x{height}, at least "
                                                "64 px on each side")
            boxes.append(tuple(box))
        for left, right in zip(boxes, boxes[1:]):
            if right[0] < left[2]:
                raise self.fail("face_regions", "boxes go left to right without overlapping")
        return tuple(boxes)
