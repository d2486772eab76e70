"""Where a store lives: a local path, or an object-storage URL (s3://, gs://, file://, any fsspec protocol).

The few things camkd does with a location: parse it, open its Zarr group (zarr's LocalStore for a
local path, exactly as before; zarr's FsspecStore for a URL), ask whether something is there and
whether it is a Zarr group, delete it. A URL is never turned into a ``Path`` (``Path("s3://b/x")``
collapses ``//``).

Credentials and endpoints come only from the environment, through the clients' own chains (s3fs
reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_DEFAULT_REGION
through botocore; the endpoint from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, passed on below, or
fsspec's FSSPEC_S3_ENDPOINT_URL; gcsfs reads GOOGLE_APPLICATION_CREDENTIALS). A URL that carries
credentials (``s3://KEY:SECRET@bucket``) is refused, so they can reach neither the store's attrs nor
a log line; nothing read from the environment is recorded anywhere.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import zarr
from zarr.core.sync import sync

from camkd.errors import CamkdError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.S)
_COLLAPSED = re.compile(r"^(s3|s3a|gs|gcs):/(?!/)(.+)$")  # what Path("s3://b/x") makes of a URL: "s3:/b/x"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]*")  # the characters S3 and GCS allow in a bucket name
LOCAL_PROTOCOLS = ("file", "local")
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
ENV_HINT = {"s3": "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), AWS_ENDPOINT_URL for other S3 services",
            "gs": "GOOGLE_APPLICATION_CREDENTIALS"}


@dataclass(frozen=True)
class Location:
    """A parsed store location. ``protocol`` is "file" for a local path; ``path`` is the filesystem path
    (local) or "bucket/prefix" (remote, no scheme, no trailing slash); ``url`` is what messages show."""

    url: str
    protocol: str
    path: str

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.url} is not a local path")
        return Path(self.path)

    def __str__(self) -> str:
        return self.url

    # -- opening -------------------------------------------------------------------------------
    def zarr_store(self, *, read_only: bool = False) -> Any:
        """What zarr opens: the path string for a local store (zarr's LocalStore), an FsspecStore for a URL."""
        if self.is_local:
            return str(self.local_path)
        from zarr.storage import FsspecStore

        try:
            return FsspecStore.from_url(self.url, storage_options=storage_options(self.protocol), read_only=read_only)
        except ImportError:
            pkg, extra = EXTRAS.get(self.protocol, (f"the fsspec implementation of {self.protocol}://", None))
            how = f"pip install 'camkd[{extra}]'" if extra else f"install {pkg}"
            raise CamkdError(f"{self.url} needs {pkg}: {how}") from None
        except ValueError as e:  # fsspec: unknown protocol
            raise CamkdError(f"{self.url}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a client that connects when made (ftp, sftp): unknown host, refused, ...
            raise CamkdError(f"cannot reach {self.url}: {_reason(e)}") from None

    def open_group(self, mode: str, **kw) -> zarr.Group:
        """zarr.open_group on this location (``mode`` as zarr's: r, r+, w, a)."""
        if self.is_local:
            return zarr.open_group(str(self.local_path), mode=mode, **kw)
        return zarr.open_group(self.zarr_store(read_only=mode == "r"), mode=mode, **kw)

    # -- questions and deletion ----------------------------------------------------------------
    def _remote(self, what: str, fn):
        """Run an async fsspec call on zarr's event loop; client errors become one clean line (no secrets)."""
        store = self.zarr_store()
        store.fs.invalidate_cache()  # the instance is shared: listings cached earlier may be stale (other writers)
        try:
            return sync(fn(store.fs, store.path))
        except FileNotFoundError:
            raise
        except PermissionError as e:
            raise CamkdError(f"cannot {what} {self.url}: access denied ({_reason(e)}); credentials come from the environment: "
                             f"{ENV_HINT.get(_family(self.protocol), 'see your storage client')}") from None
        except OSError as e:
            raise CamkdError(f"cannot {what} {self.url}: {_reason(e)}") from None
        except Exception as e:  # noqa: BLE001 - botocore's NoCredentialsError, EndpointConnectionError, ...
            raise CamkdError(f"cannot {what} {self.url}: {_reason(e)}; credentials and endpoint come from the environment: "
                             f"{ENV_HINT.get(_family(self.protocol), 'see your storage client')}") from None

    def exists(self) -> bool:
        """Anything at this location: a local file or folder, or any object under the remote prefix."""
        if self.is_local:
            return self.local_path.exists()
        return bool(self._remote("reach", lambda fs, p: fs._exists(p)))

    def is_zarr(self) -> bool:
        """A Zarr v3 node's metadata (zarr.json) is there."""
        if self.is_local:
            return (self.local_path / "zarr.json").exists()
        return bool(self._remote("reach", lambda fs, p: fs._exists(f"{p}/zarr.json")))

    def delete(self) -> None:
        """Remove the store and everything under it (local folder, or every object under the prefix)."""
        if self.is_local:
            shutil.rmtree(self.local_path)
            return

        async def rm(fs, p):
            try:
                await fs._rm(p, recursive=True)
            except FileNotFoundError:
                pass

        self._remote("delete", rm)


def _family(protocol: str) -> str:
    return {"s3a": "s3", "gcs": "gs"}.get(protocol, protocol)


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.splitlines()[0][:200]


def storage_options(protocol: str) -> dict:
    """Options for the fsspec filesystem, from the environment only (never stored, never logged).

    s3: the endpoint from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (botocore reads them too; passing
    them makes older botocore and s3fs versions honour them), unless fsspec's own
    FSSPEC_S3_ENDPOINT_URL / FSSPEC_S3 configuration already sets one. Credentials are left to the
    client's own chain.
    """
    opts: dict = {}
    if _family(protocol) == "s3":
        import fsspec.config

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        configured = fsspec.config.conf.get(protocol, {})
        if endpoint and "endpoint_url" not in configured and "endpoint_url" not in configured.get("client_kwargs", {}):
            opts["endpoint_url"] = endpoint
    return opts


def parse_location(where: str | os.PathLike | Location) -> Location:
    """A store location from a path, a ``file://`` URL or an object-storage URL (s3://bucket/prefix.zarr, gs://...)."""
    if isinstance(where, Location):
        return where
    if isinstance(where, PurePath):
        text = str(where)
        m = _COLLAPSED.match(text)
        if m:  # a URL that went through Path: s3:/bucket/x -> s3://bucket/x
            return parse_location(f"{m.group(1)}://{m.group(2)}")
        return Location(text, "file", text)
    text = os.fspath(where)
    m = _SCHEME.match(text)
    if not m:
        p = str(Path(text))
        return Location(p, "file", p)
    protocol, rest = m.group(1).lower(), m.group(2)
    if _carries_credentials(protocol, rest):  # nothing of the URL is echoed: any part of it may be the secret
        raise CamkdError(f"the {protocol}:// URL carries credentials (USER:SECRET@ before the bucket); remove them from the URL "
                         "and give them through the environment (" + ENV_HINT.get(_family(protocol), "see your storage client") + ")")
    if protocol in LOCAL_PROTOCOLS:
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        if not rest:
            raise CamkdError(f"{text}: no path after {protocol}://")
        p = str(Path(rest))
        return Location(p, "file", p)
    rest = rest.rstrip("/")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise CamkdError(f"{text}: give a bucket and a prefix, e.g. {protocol}://BUCKET/stores/x.zarr")
    return Location(f"{protocol}://{rest}", protocol, rest)


def _carries_credentials(protocol: str, rest: str) -> bool:
    """Whether the text after ``protocol://`` starts with credentials (``USER:SECRET@`` or ``TOKEN@``).

    A secret may hold any character, ``/`` and ``@`` included (AWS secrets often contain ``/``), so the
    authority cannot be cut at the first ``/``: bucket names hold neither ``:`` nor ``@`` (S3: letters,
    digits, ``.`` and ``-``; GCS adds ``_``), so either one in the first path segment means credentials.
    Other protocols name hosts: there ``@`` anywhere in the first segment, or a ``:`` not followed by a
    port number, does.
    """
    first = rest.split("/", 1)[0]
    if "@" in first:
        return True
    if _family(protocol) in ("s3", "gs"):  # a token with a '/' and no ':' leaves an invalid bucket name before the '@'
        return ":" in first or ("@" in rest and not _BUCKET.fullmatch(first))
    return ":" in first and not first.rsplit(":", 1)[1].isdigit()


def listed_sizes(g: zarr.Group) -> dict[str, int] | None:
    """Size of every object of a remote store by key, from a listing; None for a local store (or sizes unknown)."""
    from zarr.storage import FsspecStore

    store = g.store
    if not isinstance(store, FsspecStore):
        return None
    root = store.path.rstrip("/")
    store.fs.invalidate_cache()  # other processes may have written or deleted objects since a cached listing
    found = sync(store.fs._find(root, detail=True))
    out = {}
    for full, info in found.items():
        if info.get("type") == "directory":
            continue
        if info.get("size") is None:
            return None
        out[full[len(root) + 1:] if full.startswith(root + "/") else full] = int(info["size"])
    return out
