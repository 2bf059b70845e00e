"""Source trees read as repositories: which repository each file belongs to, and under which licenses.

An input folder may be one repository or a folder of checkouts (`repos/acme-tools/LICENSE`, `repos/acme-tools/*.py`,
`repos/other/...`). A file belongs to the nearest folder above it, up to the input root, that holds `.git` (a
checkout; a vendored library's license inside it does not make another repository); without one, to the nearest
that holds a license file; without either, to the folder directly under the root when the root holds repositories
(a folder of checkouts whose members lack a license), else to the root itself. A file's licenses are those of the
nearest license files above it, up to the root.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .filters import classify_license

LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING", "COPYING.txt", "LICENSE-MIT",
                 "LICENSE-APACHE")


@dataclass(frozen=True)
class TreeFile:
    path: Path
    repo: Path  # the repository folder; its name is the repository's name
    licenses: tuple[str, ...]  # SPDX ids

    @property
    def relative(self) -> str:
        """The file's path inside its repository."""
        return str(self.path.relative_to(self.repo))


def folder_licenses(folder: Path) -> list[str] | None:
    """The SPDX ids of a folder's license files ([] when none is recognized), or None when it has none."""
    found = [folder / name for name in LICENSE_FILES if (folder / name).is_file()]
    if not found:
        return None
    licenses: list[str] = []
    for path in found:
        spdx = classify_license(path.read_text(encoding="utf-8", errors="replace"))
        if spdx and spdx not in licenses:
            licenses.append(spdx)
    return licenses


def tree_files(root: Path) -> Iterator[TreeFile]:
    """Every file under root in path order (not license files, nothing under .git), with its repository and
    licenses."""
    paths = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.name not in LICENSE_FILES and ".git" not in p.relative_to(root).parts)
    licenses_of = functools.cache(folder_licenses)

    checkout = functools.cache(lambda folder: (folder / ".git").exists())

    def is_repository(folder: Path) -> bool:
        return checkout(folder) or licenses_of(folder) is not None

    def up_to_root(folder: Path) -> list[Path]:
        return [folder, *folder.parents[: len(folder.relative_to(root).parts)]]

    checkouts = not is_repository(root) and any(is_repository(f) for p in paths for f in up_to_root(p.parent)[:-1])
    for path in paths:
        folders = up_to_root(path.parent)
        repo = next((f for f in folders if checkout(f)), None) or next((f for f in folders if is_repository(f)), None)
        if repo is None:
            repo = folders[-2] if checkouts and len(folders) > 1 else root
        licenses = next((found for f in folders if (found := licenses_of(f)) is not None), [])
        yield TreeFile(path, repo, tuple(licenses))
