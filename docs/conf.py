"""Sphinx configuration of the seccomp-supervisor documentation.

Built by ``./dev.sh test`` in strict mode (``sphinx-build -W --keep-going -n``: any
warning, such as a broken link or reference, fails the build) and served locally by
``./dev.sh docs``. Pages are Markdown (MyST). Nothing is fetched from the network: the
theme (furo) ships its assets and uses the system's fonts.
"""

from supervisor import __version__

project = "seccomp-supervisor"
author = "the seccomp-supervisor authors"
copyright = "the seccomp-supervisor authors"
release = version = __version__

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "man"]
# Headings down to ### get anchors, so [text](page.md#heading) links are checked.
myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]
# Code blocks in languages pygments does not know would only warn.
highlight_language = "text"

html_theme = "furo"
html_title = f"seccomp-supervisor {__version__}"
html_static_path: list[str] = []
html_last_updated_fmt = None
html_show_sourcelink = False
html_copy_source = False
