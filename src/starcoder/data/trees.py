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
import os
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


def folder_licenses(folder: Path, names: list[str]) -> list[str] | None:
    """The SPDX ids of a folder's license files (`names`: those it holds; [] when none is recognized), or None when
    it has none."""
    if not names:
        return None
    licenses: list[str] = []
    for name in names:
        spdx = classify_license((folder / name).read_text(encoding="utf-8", errors="replace"))
        if spdx and spdx not in licenses:
            licenses.append(spdx)
    return licenses


@dataclass
class _Folder:
    files: list[str]  # regular files other than license files
    license_files: list[str]
    checkout: bool  # holds .git


def _listing(root: Path) -> dict[Path, _Folder]:
    """Every folder under root (not .git, not through symlinks) with what it holds: one scandir per folder."""
    folders: dict[Path, _Folder] = {}
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable: its files are not part of the input
            continue
        listing = folders[folder] = _Folder([], [], False)
        for entry in entries:
            if entry.name == ".git":
                listing.checkout = True
            elif entry.is_dir(follow_symlinks=False):
                pending.append(folder / entry.name)
            elif entry.is_file():
                (listing.license_files if entry.name in LICENSE_FILES else listing.files).append(entry.name)
    return folders


def tree_files(root: Path) -> Iterator[TreeFile]:
    """Every file under root in path order (not license files, nothing under .git), with its repository and
    licenses. Each folder is looked at once (a tree of 50,000 files costs little more than listing it)."""
    folders = _listing(root)

    def licenses_of(folder: Path) -> list[str] | None:
        return folder_licenses(folder, folders[folder].license_files)

    @functools.cache
    def nearest(folder: Path) -> tuple[Path | None, Path | None, tuple[str, ...]]:
        """The nearest checkout and license folder at or above folder, up to root, and the nearest licenses."""
        above = nearest(folder.parent) if folder != root else (None, None, ())
        licenses = licenses_of(folder)
        return (folder if folders[folder].checkout else above[0], folder if licenses is not None else above[1],
                tuple(licenses) if licenses is not None else above[2])

    def is_repository(folder: Path) -> bool:
        return folders[folder].checkout or bool(folders[folder].license_files)

    checkouts = not is_repository(root) and any(is_repository(folder) for folder in folders if folder != root)
    files: list[TreeFile] = []
    for folder, listing in folders.items():
        checkout, licensed, licenses = nearest(folder)
        repo = checkout or licensed
        if repo is None:
            repo = root / folder.relative_to(root).parts[0] if checkouts and folder != root else root
        files += [TreeFile(folder / name, repo, licenses) for name in listing.files]
    yield from sorted(files, key=lambda f: f.path)
