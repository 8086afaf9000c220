"""Local copies of the JavaScript libraries that circuit-tracer's viewer loads from public CDNs.

The viewer's pages load d3, d3-jetpack, dagre and pako from transformer-circuits.pub and unpkg, so
offline they render blank. The same libraries are npm packages. Each is pinned here to a version
and to the sha512 integrity that the npm registry publishes for its tarball; `fetch_assets`
(`emc graph assets`, run by scripts/install.sh) downloads the tarballs once into a cache, and
every use verifies them again. No third-party code is committed to this repository.

Why these versions:
- d3 7.9.0: the viewer's code needs d3 v6 or later: listeners take `(event, datum)`, and it calls
  `d3.pointer`, `d3.sort`, `d3.group` and `d3.minIndex`, which v5 lacks.
- d3-jetpack 2.2.1: adds `selection.at/st/appendMany/translate`, "tag.class" names in `append`,
  and `d3.conventions`, `d3.nestBy`, `d3.clamp`. Its UMD build extends the global `d3`; the 2.3.0
  build replaces it with an empty object (`global.d3 = {}`) and its bundled `d3v7+jetpack.js`
  patches a second, unused copy of d3-selection, so neither works next to d3 v7. The one thing
  the viewer's own jetpack build has beyond npm's, `c.drawAxis(svg)`, is a few lines in
  emc.viewer.frontend.
- d3-collection 1.0.7: d3-jetpack's `nestBy` calls `d3.nest`, which d3 v6 removed.
- dagre 0.8.5 and pako 2.1.0: the versions the viewer's index.html names.

Left out: `hotserver-client-ws.js` (the live-reload client of the frontend's development server)
and `npy_v0.js` (reads `.npy` arrays, which only the "addition" demo page loads; attribution
graphs are JSON).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from emc.viewer.errors import AssetError

NPM_REGISTRY = "https://registry.npmjs.org"
ASSETS_ENV = "EMC_VIEWER_ASSETS"
FETCH_COMMAND = "emc graph assets"


class Asset(BaseModel):
    """One file of one pinned npm package, as the served frontend's `vendor/<name>`."""

    model_config = ConfigDict(frozen=True)

    package: str
    version: str
    integrity: str  # the registry's dist.integrity of the tarball: "sha512-<base64>"
    member: str  # the file inside the tarball
    name: str  # its name under vendor/

    @property
    def tarball(self) -> str:
        return f"{self.package}-{self.version}.tgz"

    def url(self, registry: str = NPM_REGISTRY) -> str:
        return f"{registry.rstrip('/')}/{self.package}/-/{self.tarball}"


ASSETS: tuple[Asset, ...] = (
    Asset(
        package="d3",
        version="7.9.0",
        integrity="sha512-e1U46jVP+w7Iut8Jt8ri1YsPOvFpg46k+K8TpCb0P+zjCkjkPnV7WzfDJzMHy1LnA+wj5pLT1wjO901gLXeEhA==",
        member="package/dist/d3.min.js",
        name="d3.min.js",
    ),
    Asset(
        package="d3-collection",
        version="1.0.7",
        integrity="sha512-ii0/r5f4sjKNTfh84Di+DpztYwqKhEyUlKoPrzUFfeSkWxjW49xU2QzO9qrPrNkpdI0XJkfzvmTu8V2Zylln6A==",
        member="package/dist/d3-collection.min.js",
        name="d3-collection.min.js",
    ),
    Asset(
        package="d3-jetpack",
        version="2.2.1",
        integrity="sha512-AZaxOnEqdLePnYUQlHYhH/VJk1T6M/k9w+/U9sSL++6jYLjyEERCtD9wAg1MMsCAGcrnLFx+pl09ZpL5rj862Q==",
        member="package/build/d3-jetpack.cjs",  # a UMD script despite the extension
        name="d3-jetpack.js",
    ),
    Asset(
        package="dagre",
        version="0.8.5",
        integrity="sha512-/aTqmnRta7x7MCCpExk7HQL2O4owCT2h8NT//9I1OQ9vt29Pa0BzSAkR5lwFUcQ7491yVi/3CXU9jQ5o0Mn2Sw==",
        member="package/dist/dagre.min.js",
        name="dagre.min.js",
    ),
    Asset(
        package="pako",
        version="2.1.0",
        integrity="sha512-w+eufiZ1WuJYgPXbV/PO3NCMEc3xqylkKHzp8bxp1uW4qaSNQUkwmLLEc3kKsfz8lpV1F8Ht3U1Cm+9Srog2ug==",
        member="package/dist/pako.min.js",
        name="pako.min.js",
    ),
)


class AssetStatus(BaseModel):
    asset: Asset
    path: Path
    state: Literal["ok", "missing", "corrupted", "downloaded"]


def asset_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The argument, else $EMC_VIEWER_ASSETS, else ~/.cache/emc/viewer-assets."""
    chosen = cache_dir or os.environ.get(ASSETS_ENV)
    return Path(chosen or Path.home() / ".cache" / "emc" / "viewer-assets").expanduser()


def integrity_of(data: bytes) -> str:
    """npm's Subresource Integrity string of some bytes (sha512, base64)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def check_assets(
    cache_dir: str | Path | None = None, assets: Sequence[Asset] = ASSETS
) -> list[AssetStatus]:
    """Each pinned tarball in the cache: ok, missing, or corrupted (integrity differs)."""
    root = asset_cache_dir(cache_dir)
    return [AssetStatus(asset=a, path=root / a.tarball, state=_state(root, a)) for a in assets]


def require_assets(cache_dir: str | Path | None = None, assets: Sequence[Asset] = ASSETS) -> Path:
    """The cache directory, once every tarball in it verifies; else AssetError naming the fix."""
    root = asset_cache_dir(cache_dir)
    problems = [s for s in check_assets(root, assets) if s.state != "ok"]
    if problems:
        listed = ", ".join(f"{s.asset.tarball} {s.state}" for s in problems)
        hint = f" --cache {root}" if cache_dir else ""
        raise AssetError(
            f"the viewer's JavaScript libraries are not ready in {root} ({listed}): run "
            f"`{FETCH_COMMAND}{hint}` (or scripts/install.sh) to download and verify them"
        )
    return root


def fetch_assets(
    cache_dir: str | Path | None = None,
    assets: Sequence[Asset] = ASSETS,
    registry: str = NPM_REGISTRY,
    timeout_s: float = 60.0,
) -> list[AssetStatus]:
    """Download every tarball that is missing or corrupted; verified ones are left alone.

    A download is written only after its integrity matches the pin, so the cache never holds an
    unverified file; a mismatch raises AssetError.
    """
    root = asset_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    statuses = []
    for asset in assets:
        path = root / asset.tarball
        if _state(root, asset) == "ok":
            statuses.append(AssetStatus(asset=asset, path=path, state="ok"))
            continue
        data = _download(asset.url(registry), timeout_s)
        found = integrity_of(data)
        if found != asset.integrity:
            raise AssetError(
                f"{asset.url(registry)} does not match its pinned integrity (expected "
                f"{asset.integrity}, got {found}); nothing was written"
            )
        _write_atomically(path, data)
        statuses.append(AssetStatus(asset=asset, path=path, state="downloaded"))
    return statuses


def read_asset(asset: Asset, cache_dir: str | Path | None = None) -> bytes:
    """The asset's file from its tarball, after checking the tarball's integrity."""
    path = asset_cache_dir(cache_dir) / asset.tarball
    data = path.read_bytes() if path.is_file() else b""
    if integrity_of(data) != asset.integrity:
        raise AssetError(f"{path} is missing or corrupted: run `{FETCH_COMMAND}`")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        member = archive.extractfile(asset.member)
        if member is None:
            raise AssetError(f"{asset.tarball} has no file {asset.member}")
        return member.read()


def _state(root: Path, asset: Asset) -> Literal["ok", "missing", "corrupted"]:
    path = root / asset.tarball
    if not path.is_file():
        return "missing"
    return "ok" if integrity_of(path.read_bytes()) == asset.integrity else "corrupted"


def _download(url: str, timeout_s: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.read()
    except (urllib.error.URLError, OSError) as exc:
        raise AssetError(f"cannot download {url}: {exc}") from exc


def _write_atomically(path: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
