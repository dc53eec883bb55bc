"""The named datasets that are downloaded on first use: where each file comes from and its sha256.

``amazon-beauty`` and ``amazon-sports`` are the Amazon 2014 sets as S3-Rec prepared them (the
files TIGER, P5 and LETTER measure on), with P5's id maps and, fetched only when a config asks for
them (``tokenizer.attributes: dataset``), S3-Rec's item attributes; ``amazon-instruments`` is LC-Rec's Amazon
2018 Musical Instruments set (LETTER, LC-Rec) with its id maps. Each file is fetched from the
repository and commit named here and checked against its sha256, so a moved branch or a changed
file can never change the data silently. ``$ETEGREC_DATA_MIRROR`` replaces the base URL
(``https://raw.githubusercontent.com``) for a mirror, or a local server in the tests.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

__all__ = ["DATASETS", "MIRROR_ENV", "NamedDataset", "RemoteFile", "fetch_attributes", "fetch_named", "file_sha256"]

MIRROR_ENV = "ETEGREC_DATA_MIRROR"
DEFAULT_MIRROR = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a named dataset: its name in the cache, the GitHub repository, commit and path it
    comes from, and its sha256."""

    name: str
    repo: str
    commit: str
    path: str
    sha256: str

    def url(self) -> str:
        mirror = os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
        return f"{mirror.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


@dataclass(frozen=True)
class NamedDataset:
    """A dataset known by name: its files (the interaction file first, then its id maps), the
    named config it is meant to run with, and its item attributes file, if one is published."""

    files: tuple[RemoteFile, ...]
    config: str
    attributes: RemoteFile | None = None


_ICLREC = ("salesforce/ICLRec", "2890e6c3ff6a22c6699fc19cb863b66786c1cde4")  # S3-Rec's sequence files
_P5 = ("Wenyueh/LLM-RecSys-ID", "2200ad9fef647ef755c01d6d7e5c5de3082606c5")  # P5's datamaps.json
_LETTER = ("HonghuiBao2000/LETTER", "8d0154e28de37dbb6e24871c508ad8ddb1921cda")
_GENREC = ("WncFht/GenRec", "6b50a813e071f6e31b4052319f1b723ea01a934f")  # LC-Rec's id maps for it
_S3REC = ("aHuiWang/CIKM2020-S3Rec", "e6c774da92dba847b00ac89e8bfc5c55cc44d378")  # item attributes

DATASETS: dict[str, NamedDataset] = {
    "amazon-beauty": NamedDataset(config="amazon", files=(
        RemoteFile("Beauty.txt", *_ICLREC, "data/Beauty.txt",
                   "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8"),
        RemoteFile("datamaps.json", *_P5, "data/beauty/datamaps.json",
                   "715ab04838ff1ba21238475ed453a89e8c30aa6214b904d27a79e4168fc7b612"),
    ), attributes=RemoteFile("Beauty_item2attributes.json", *_S3REC, "data/Beauty_item2attributes.json",
                             "129e40f67486f6877eff0f5318cfa8530ee8ac23d8b0d1de04e1bb7a2ba0b2d4")),
    "amazon-sports": NamedDataset(config="amazon", files=(
        RemoteFile("Sports_and_Outdoors.txt", *_ICLREC, "data/Sports_and_Outdoors.txt",
                   "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2"),
        RemoteFile("datamaps.json", *_P5, "data/sports/datamaps.json",
                   "4a4d9785ab99a89a499f25023892a647a2280086041c9c9d7169c9dc2ee0b715"),
    ), attributes=RemoteFile("Sports_and_Outdoors_item2attributes.json", *_S3REC,
                             "data/Sports_and_Outdoors_item2attributes.json",
                             "7fb10733ac4f1811384a52144cdefa7fcc7536fa80a7232c5da9bd789155c34b")),
    "amazon-instruments": NamedDataset(config="amazon", files=(
        RemoteFile("Instruments.inter.json", *_LETTER, "data/Instruments/Instruments.inter.json",
                   "0a11d47791d90483005da93c36d826679e20e4592d1d2b86518d5f56f218e743"),
        RemoteFile("Instruments.item2id", *_GENREC, "data/Instruments/Instruments.item2id",
                   "76380000fb809cf19e841c69163310ec2d32b7b578277e2b659fbd1e72714688"),
        RemoteFile("Instruments.user2id", *_GENREC, "data/Instruments/Instruments.user2id",
                   "ae170e33f5f1e71ae21d72760e10951cac16dacaa5a20f6ede0aa26ce014bc15"),
    )),
}


def file_sha256(path: Path) -> str:
    """The sha256 of the file at ``path``, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_named(name: str, raw_dir: Path) -> Path:
    """The interaction file of named dataset ``name`` in ``raw_dir``, every file of it verified.

    Files already there (downloaded before, or put there by hand) are checked against their
    sha256; missing ones are downloaded, checked, and only then moved into place.

    Raises:
        DataError: a file with the wrong sha256 (both digests named), or a download that failed
            (the message says which file to put where, from which URL).
    """
    dataset = DATASETS[name]
    _fetch(name, dataset.files, raw_dir)
    return raw_dir / dataset.files[0].name


def fetch_attributes(name: str, raw_dir: Path) -> Path:
    """The item attributes file of named dataset ``name`` in ``raw_dir``, verified (fetched like :func:`fetch_named`).

    Raises:
        DataError: ``name`` publishes no attributes file, or as :func:`fetch_named`.
    """
    dataset = DATASETS.get(name)
    if dataset is None or dataset.attributes is None:
        having = ", ".join(n for n, d in DATASETS.items() if d.attributes is not None)
        raise DataError(f"dataset {name!r} has no published item attributes file (tokenizer.attributes: dataset "
                        f"is for {having}); give the path of an attributes file instead")
    _fetch(name, (dataset.attributes,), raw_dir)
    return raw_dir / dataset.attributes.name


def _fetch(name: str, files: tuple[RemoteFile, ...], raw_dir: Path) -> None:
    for file in files:
        dest = raw_dir / file.name
        if dest.exists():
            got = file_sha256(dest)
            if got != file.sha256:
                raise DataError(f"{dest}: sha256 {got} is not the expected {file.sha256} of {name}'s {file.name}; "
                                f"delete it to download it again, or put the file from {file.url()} there")
    missing = [file for file in files if not (raw_dir / file.name).exists()]
    for file in missing:
        _download(name, file, raw_dir, missing)


def _download(name: str, file: RemoteFile, raw_dir: Path, missing: list[RemoteFile]) -> None:
    dest = raw_dir / file.name
    url = file.url()
    raw_dir.mkdir(parents=True, exist_ok=True)
    print(f"{name}: no local copy of {file.name}; downloading {url} into {raw_dir}", file=sys.stderr)
    # one temporary file per process: every rank of a multi-process run may download at once
    handle, partial_name = tempfile.mkstemp(prefix=file.name + ".", suffix=".partial", dir=raw_dir)
    os.close(handle)
    partial = Path(partial_name)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except (urllib.error.URLError, OSError) as exc:  # no network, DNS, HTTP 404, timeout, full disk
        partial.unlink(missing_ok=True)
        # "HTTP Error 404: Not Found" says more than its reason; a URLError's reason is the socket error
        reason = exc.reason if type(exc) is urllib.error.URLError else exc
        places = "; ".join(f"{raw_dir / f.name} from {f.url()}" for f in missing if not (raw_dir / f.name).exists())
        raise DataError(f"{name}: cannot download {url} ({reason}); on a machine without internet, place "
                        f"each file by hand: {places}") from None
    if digest.hexdigest() != file.sha256:
        partial.unlink(missing_ok=True)  # a bad download is never kept, so it is never used
        raise DataError(f"{name}: {file.name} downloaded from {url} has sha256 {digest.hexdigest()}, expected "
                        f"{file.sha256}; the download was discarded; try again, or put the right file at {dest}")
    partial.replace(dest)
