"""The explorer page in a notebook: ``result.explore()`` shows the page the server serves at
``/`` (one implementation, ``server/explorer.html``), with the result embedded as JSON instead of
a chat box. Click a generated token to colour its sources. Runs wherever a notebook shows HTML
(Jupyter, VS Code); no server and no extra package."""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

from .server.payload import attribution_json


def page() -> str:
    return resources.files("llama_attrib.server").joinpath("explorer.html").read_text(encoding="utf-8")


class Explorer:
    """A result on the explorer page; ``_repr_html_`` for notebooks, :meth:`to_html` for a file."""

    def __init__(self, result: Any, top: int = 5, by: str = "token", document: str | None = None) -> None:
        self.data = attribution_json(result, top, by, document)

    def to_html(self, path: str | None = None) -> str:
        """The whole page with the result embedded (also written to ``path``, if given)."""
        data = json.dumps(self.data).replace("</", "<\\/")  # no "</script>" inside the script
        embedded = f'<script id="llama-attrib-data" type="application/json">{data}</script>\n<script>'
        text = page().replace("<script>", embedded, 1)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def _repr_html_(self) -> str:
        # in an iframe: the page's script and styles stay out of the notebook's own
        return (
            f'<iframe srcdoc="{html.escape(self.to_html(), quote=True)}" '
            'style="width:100%;height:640px;border:1px solid #ddd" sandbox="allow-scripts"></iframe>'
        )
