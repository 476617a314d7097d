"""The archive format of a package: a reproducible .tar.gz of one folder (a partial one is never
left behind, a full disk says how much space it needs), SHA256SUMS written and read, and the
member check that refuses anything unsafe to extract."""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path, PurePosixPath

from llama_sft.errors import DiskFullError, VerifyError
from llama_sft.files import disk_full_message, out_of_space, sha256_file, tree_bytes
from llama_sft.layout import SUMS

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def write_sums(folder: Path) -> dict[str, str]:
    """SHA256SUMS (sha256sum format) over every file in `folder` except itself."""
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != SUMS}
    (folder / SUMS).write_text("".join(f"{d}  {n}\n" for n, d in sums.items()), encoding="utf-8")
    return sums


def create_archive(folder: Path, archive: Path, *, mtime: int) -> list[str]:
    """A gzipped tar of `folder` as one top-level directory: regular files only, sorted, owner
    0:0, modes 0644/0755, one mtime for all (no user names, umask or file times leak in).
    Written under a temporary name and renamed: a failed write removes the partial archive, and
    a full disk (or quota) raises DiskFullError saying how much space it needs."""
    tmp = archive.with_name(f".{archive.name}.tmp")
    try:
        names = _write_tar(folder, tmp, mtime)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        # At most the files' own size: gzip shrinks the JSON and text, not the weights.
        needed = tree_bytes(folder)
        if not out_of_space(e, archive.parent, needed):
            raise
        raise DiskFullError(
            disk_full_message(f"the archive {archive.name}", archive.parent, needed)
            + " The partial archive was removed. Free some space there, or choose another "
            "--output-dir") from e
    os.replace(tmp, archive)
    return names


def _write_tar(folder: Path, tmp: Path, mtime: int) -> list[str]:
    import gzip

    top = folder.name
    names = []
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=mtime,
                                               filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(top)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
        tar.addfile(info)
        names.append(top + "/")
        for p in sorted(folder.iterdir()):
            info = tarfile.TarInfo(f"{top}/{p.name}")
            info.size, info.mode, info.mtime = p.stat().st_size, 0o644, mtime
            with open(p, "rb") as fh:
                tar.addfile(info, fh)
            names.append(info.name)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    return names


def check_member(member: tarfile.TarInfo) -> str | None:
    """Why a member is unsafe to extract, or None."""
    name = member.name
    if not name or "\x00" in name:
        return "an empty or NUL-containing name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "a '..' path component"
    if member.issym() or member.islnk():
        return "a link"
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        return "a device or FIFO"
    if not (member.isreg() or member.isdir()):
        return "not a regular file or folder"
    return None


def read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if not m:
            raise VerifyError(f"{SUMS} line {lineno} is malformed")
        digest, rel = m.groups()
        if check_member(tarfile.TarInfo(rel)) or "/" in rel:
            raise VerifyError(f"{SUMS} line {lineno} names an unsafe path")
        if rel in sums:
            raise VerifyError(f"{SUMS} lists {rel} twice")
        sums[rel] = digest
    return sums
