"""mkdocs hook: adds the reference pages generated from the code (`baez_ray/reference.py`)
to the site, so that the config keys, table columns, methods and CLI flags it shows are
those of the checkout being built."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, whatever the venv installed


def on_files(files, config):
    from mkdocs.structure.files import File

    from baez_ray import reference

    for path, text in reference.pages(ROOT).items():
        files.append(File.generated(config, path, content=text))
    return files
