"""Which images are reference images of which targets, for edit LoRAs (reference image(s) + target + instruction).

Decided from names alone, on parts tuples (paths relative to the dataset root): the rules are in dataset.py's
docstring. A file recognised as a reference is never a training target, whether or not references are used:
switching them off trains text-to-image on the targets only, never on the references too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

REFERENCES_FOLDER = "references"  # exact name: holds references of the images of the folder above it
_SIDECAR = re.compile(r"(.+)_ref(\d*)")  # a_ref.png, a_ref2.png beside a.png
_NUMBERED = re.compile(r"(.+)_(\d+)")  # references/a_2.png: one more reference of a.png

Parts = tuple[str, ...]


@dataclass
class ReferenceMap:
    """What the sidecar and folder rules found."""

    by_target: dict[Parts, list[Parts]] = field(default_factory=dict)  # in order
    files: set[Parts] = field(default_factory=set)  # every reference file: never a target
    unattached: list[Parts] = field(default_factory=list)  # references whose target is not in the dataset


def find_references(images, folder_files: dict[Parts, list[str]], listed: set[Parts]) -> ReferenceMap:
    """Sort `images` (every image found outside `references/` folders) into targets and references.

    `folder_files`: folder -> image names in its `references/` sub-folder; `listed`: the files metadata lines
    name as references (never targets either). A sidecar `x_ref.png` is a reference only when an image `x.*` is
    in its folder; it is then attached to every target of that stem (a.png and a.jpg share a_ref.png).
    """
    refs = ReferenceMap(files=set(listed))
    stems: dict[tuple[Parts, str], list[Parts]] = {}
    for parts in images:
        stems.setdefault((parts[:-1], _stem(parts)), []).append(parts)
    sidecars = {}
    for parts in images:
        match = _SIDECAR.fullmatch(_stem(parts))
        if match and (parts[:-1], match.group(1)) in stems:
            sidecars[parts] = (parts[:-1], match.group(1), (0, int(match.group(2) or -1), parts[-1]))
    refs.files |= sidecars.keys()
    targets = {key: [p for p in found if p not in refs.files] for key, found in stems.items()}
    candidates = [(parts, *where) for parts, where in sidecars.items()]
    for folder, names in folder_files.items():
        for name in names:
            parts, stem = (*folder, REFERENCES_FOLDER, name), os.path.splitext(name)[0]
            refs.files.add(parts)
            match = _NUMBERED.fullmatch(stem)
            if targets.get((folder, stem)) or not match:  # the exact stem wins: references/img_1.png is img_1's
                candidates.append((parts, folder, stem, (1, -1, name)))
            else:
                candidates.append((parts, folder, match.group(1), (1, int(match.group(2)), name)))
    attached: dict[Parts, list[tuple[tuple, Parts]]] = {}
    for parts, folder, stem, order in candidates:
        owners = targets.get((folder, stem))
        if not owners:  # x_ref_ref.png of a reference x_ref.png, or references/b.png without a b.*
            refs.unattached.append(parts)
        for target in owners or ():
            attached.setdefault(target, []).append((order, parts))
    refs.by_target = {target: [parts for _, parts in sorted(found)] for target, found in attached.items()}
    refs.unattached.sort()
    return refs


def _stem(parts: Parts) -> str:
    return os.path.splitext(parts[-1])[0]
