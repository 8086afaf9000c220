"""The served frontend: circuit-tracer's viewer pages with their CDN scripts made local.

`build_frontend` copies the installed circuit-tracer's assets into a directory, adds the vendored
libraries under `vendor/` and rewrites the `<script src>` tags of the copied pages. It runs each
time the viewer starts, so a circuit-tracer upgrade is picked up and no modified copy of its files
is kept here; a page that loads a script this module does not know fails loudly instead of
rendering blank.
"""

from __future__ import annotations

import re
import shutil
from importlib.resources import as_file, files
from pathlib import Path

from emc.viewer.assets import ASSETS, read_asset, require_assets
from emc.viewer.errors import FrontendError

PAGES = ("index.html", "feature-view.html")
VENDOR_DIR = "vendor"
_LIB = "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib"
# Each CDN script -> the vendored files that replace it, in load order (none: dropped).
CDN_SCRIPTS: dict[str, tuple[str, ...]] = {
    f"{_LIB}/hotserver-client-ws.js": (),  # live reload for the frontend's development server
    f"{_LIB}/d3.js": ("d3.min.js",),
    # d3-collection first: jetpack's nestBy calls d3.nest, which d3 v7 no longer has.
    f"{_LIB}/jetpack_2024-07-20.js": ("d3-collection.min.js", "d3-jetpack.js", "emc-jetpack.js"),
    f"{_LIB}/npy_v0.js": (),  # .npy reader, used only by the "addition" demo page
    "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": ("dagre.min.js",),
    "https://unpkg.com/pako@2.1.0/dist/pako.min.js": ("pako.min.js",),
}
# What the viewer expects of d3-jetpack beyond npm's 2.2.1: `c.drawAxis(svg)` on the object that
# d3.conventions returns (npm has it only as d3.drawAxis(c), drawing into c.svg).
EMC_JETPACK_JS = """// Written by EMC (emc/viewer/frontend.py), loaded after d3-jetpack.
(function () {
  var conventions = d3.conventions
  d3.conventions = function (options) {
    var c = conventions(options)
    c.drawAxis = function (svg) {
      return d3.drawAxis(Object.assign({}, c, {svg: svg || c.svg}))
    }
    return c
  }
})()
"""
_SCRIPT = re.compile(r"""<script\s+src=(["'])(?P<src>[^"']+)\1\s*>\s*</script>""")
_REMOTE = re.compile(r"^(https?:)?//", re.IGNORECASE)


def rewrite_scripts(html: str) -> str:
    """Replace each known CDN `<script src>` by the local files; local scripts stay as they are."""

    def replace(match: re.Match[str]) -> str:
        src = match["src"]
        if not _REMOTE.match(src):
            return match[0]
        if src not in CDN_SCRIPTS:
            raise FrontendError(
                f"circuit-tracer's viewer loads {src}, which EMC has no local copy of; add it to "
                "emc.viewer.assets and emc.viewer.frontend.CDN_SCRIPTS"
            )
        return "\n".join(
            f"<script src='./{VENDOR_DIR}/{name}'></script>" for name in CDN_SCRIPTS[src]
        )

    return _SCRIPT.sub(replace, html)


COMPARE_PAGE = "compare.html"
# EMC's own page: two of the viewer's pages side by side, `?base=<slug>&adapted=<slug>`, so a
# prompt's base and adapted graphs are read together (the viewer shows one graph per page).
COMPARE_HTML = """<!DOCTYPE html>
<meta charset='utf-8'>
<title>Base vs adapted: attribution graphs</title>
<style>
  body { margin: 0; font-family: sans-serif; }
  .pair { display: flex; height: 100vh; }
  .side { flex: 1; display: flex; flex-direction: column; border-left: 1px solid #ccc; }
  .side h2 { margin: 4px 8px; font-size: 14px; }
  iframe { flex: 1; border: 0; width: 100%; }
</style>
<div class='pair'>
  <div class='side'><h2>base</h2><iframe id='base' title='base graph'></iframe></div>
  <div class='side'><h2>adapted</h2><iframe id='adapted' title='adapted graph'></iframe></div>
</div>
<script>
  var params = new URLSearchParams(window.location.search)
  for (var role of ['base', 'adapted']) {
    var slug = params.get(role)
    if (slug) document.getElementById(role).src = './index.html?slug=' + encodeURIComponent(slug)
  }
</script>
"""


def build_frontend(
    target: str | Path, cache_dir: str | Path | None = None, source: str | Path | None = None
) -> Path:
    """Write the offline frontend into `target` (created if needed) and return it.

    `source` defaults to the installed circuit-tracer's assets. Raises AssetError when the
    vendored libraries are missing or fail their integrity check.
    """
    cache = require_assets(cache_dir)
    target = Path(target)
    if source is None:
        with as_file(files("circuit_tracer") / "frontend" / "assets") as installed:
            shutil.copytree(installed, target, dirs_exist_ok=True)
    else:
        shutil.copytree(source, target, dirs_exist_ok=True)
    vendor = target / VENDOR_DIR
    vendor.mkdir(exist_ok=True)
    for asset in ASSETS:
        (vendor / asset.name).write_bytes(read_asset(asset, cache))
    (vendor / "emc-jetpack.js").write_text(EMC_JETPACK_JS, encoding="utf-8")
    for page in PAGES:
        path = target / page
        if path.is_file():
            path.write_text(rewrite_scripts(path.read_text(encoding="utf-8")), encoding="utf-8")
    (target / COMPARE_PAGE).write_text(COMPARE_HTML, encoding="utf-8")
    return target
