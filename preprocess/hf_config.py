"""A checkpoint's Hugging Face processor config: found where transformers finds it, checked key by key.

transformers (5.x: image_processing_base.py, video_processing_utils.py, feature_extraction_utils.py)
reads the first of: the processor's dict nested in processor_config.json (how v5 saves a processor),
then the processor's own file (video_preprocessor_config.json for videos), then
preprocessor_config.json (where Qwen2.5-VL keeps the settings its video processor also reads).

`settings` turns such a dict into keyword arguments for a frozen config dataclass. A null value
is not "the default" in transformers: from_dict sets the attribute to None, so a null flag is off
and a null resample is bilinear (the resize default); callers say what their other nulls mean, and
a null that would make the reference fail is refused. A key that would change the output in a way
this project does not implement must be off, and any other key we do not know is an error: a
checkpoint whose preprocessing we would silently get wrong must fail to load, not serve wrong pixels.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

PROCESSOR_FILE = "processor_config.json"
IMAGE_FILE = "preprocessor_config.json"
VIDEO_FILE = "video_preprocessor_config.json"

# Saved by transformers next to the settings, but with no effect on the numbers: class names, output
# container choices, and (for these processors) the size-dict interpretation flag.
METADATA_KEYS = frozenset({
    "processor_class", "_processor_class", "image_processor_type", "video_processor_type",
    "feature_extractor_type", "auto_map", "return_tensors", "data_format", "input_data_format", "device",
    "default_to_square", "disable_grouping", "return_metadata", "video_metadata", "image_seq_length",
})
# Generic options transformers saves for every image / video processor, which the _preprocess of
# Gemma3ImageProcessor, Qwen2VLImageProcessor and Qwen2VLVideoProcessor never reads.
INERT_KEYS = frozenset({"do_center_crop", "crop_size", "do_pad", "pad_size", "size_divisor"})


def read_config(path: str | os.PathLike, sections: tuple[str, ...], files: tuple[str, ...]) -> dict:
    """The processor dict in checkpoint dir `path`: the first of `sections` in processor_config.json,
    else the first of `files` that exists."""
    nested = os.path.join(path, PROCESSOR_FILE)
    if os.path.isfile(nested):
        with open(nested) as f:
            processor = json.load(f)
        for section in sections:
            if isinstance(processor.get(section), dict):
                return processor[section]
    for name in files:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                return json.load(f)
    raise FileNotFoundError(f"no {sections[0]} config in {os.fspath(path)!r}: looked for {PROCESSOR_FILE} "
                            f"with a {' or '.join(sections)} entry, then {', '.join(files)}")


DEFAULT = object()  # in `nulls`: a null leaves the field at its dataclass default


def settings(cls: type, raw: dict, *, unsupported: Iterable[str] = (), extra: Iterable[str] = (),
             nulls: dict | None = None) -> dict:
    """Keyword arguments for dataclass `cls` from a transformers processor dict.

    Keys naming a field of `cls` are kept. A null takes its value from `nulls` (DEFAULT: the
    field's default), else False for a bool field (None is falsy where the reference tests it),
    else raises. `unsupported` keys must be null or false; `extra` keys are the caller's to read;
    METADATA_KEYS and INERT_KEYS are ignored; anything else raises ValueError naming the key.
    """
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    unsupported, extra, nulls = frozenset(unsupported), frozenset(extra), nulls or {}
    out = {}
    for key, value in raw.items():
        if key in fields:
            if value is None:
                if key in nulls:
                    value = nulls[key]
                elif fields[key] in ("bool", bool):
                    value = False
                else:
                    raise ValueError(f"{cls.__name__}: {key} is null, which the reference processor cannot "
                                     f"run with; give it a value or remove it")
            if value is not DEFAULT:
                out[key] = tuple(value) if isinstance(value, list) else value
        elif key in unsupported:
            if value:
                raise ValueError(f"{cls.__name__}: {key}={value!r} is not supported by this server's "
                                 f"preprocessing; set it to null or false in the checkpoint's config")
        elif key not in extra and key not in METADATA_KEYS and key not in INERT_KEYS:
            raise ValueError(f"{cls.__name__}: unknown config key {key!r}; it may change the preprocessing, "
                             f"so it is refused rather than ignored (known: {', '.join(sorted(fields))})")
    return out
