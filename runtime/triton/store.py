"""A Triton model repository in an S3 (or S3-compatible) object store: push it, check it, name it.

Under ``s3://BUCKET/PREFIX/`` the store holds Triton's own repository layout, so tritonserver reads
it directly (``--model-repository=s3://...``), plus one file of posterrt's, which Triton ignores
(it loads folders only)::

    <model>/config.pbtxt      the built config, its version_policy pinned to the live version
    <model>/<N>/...           version folders: the live one and the one before it
    posterrt-store.json       per model: the live version, its content hash and files, the previous version

A push uploads a new version folder only for the models whose content hash changed, and switches a
model to it by rewriting its config.pbtxt last: until then every server, starting or reloading,
keeps serving the version the config names, so a push stopped half-way leaves the served versions
intact. A rerun finds the files already uploaded (same size and hash) and skips them. The version
before the live one is kept until the next push, so servers not yet reloaded keep their files.

Credentials come only from the standard AWS environment or profile (boto3's own lookup); nothing
here reads, prints or logs them.
"""
from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import InputError, StoreError
from .model_config import parse_pbtxt, to_pbtxt

STORE_MANIFEST = "posterrt-store.json"
MANIFEST_FORMAT = 1
CONFIG = "config.pbtxt"
# Multipart above this size, in parts of this size: a paper UNet (GBs) goes up in parallel parts
# that a failed part retries alone.
MULTIPART_BYTES = 64 << 20
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ENDPOINT = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(:\d+)?/?$")
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "ExpiredToken", "InvalidClientTokenId", "403"}
_NO_BUCKET_CODES = {"NoSuchBucket", "404"}


# --- where --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreLocation:
    bucket: str
    prefix: str  # no leading or trailing slash; "" for the bucket's root
    endpoint_url: str | None = None  # None: AWS S3 itself

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def triton_url(self) -> str:
        """The repository as tritonserver names it: ``s3://http://HOST:PORT/BUCKET/PREFIX`` for a
        store other than AWS."""
        endpoint = f"{self.endpoint_url.rstrip('/')}/" if self.endpoint_url else ""
        return f"s3://{endpoint}{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def where(self) -> str:
        return f"{self.url} at {self.endpoint_url}" if self.endpoint_url else self.url

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative


def is_store_url(text) -> bool:
    """Meant as an object-store URL (typos included: ``parse_store_url`` then says what is wrong)."""
    return isinstance(text, str) and text.lower().startswith("s3:")


def parse_store_url(text: str, endpoint_url: str | None = None, flag: str = "--repo") -> StoreLocation:
    """``s3://BUCKET/PREFIX`` (with ``endpoint_url`` for MinIO and the like), or tritonserver's own
    ``s3://http://HOST:PORT/BUCKET/PREFIX``."""
    expected = "expected s3://BUCKET/PREFIX (or s3://http://HOST:PORT/BUCKET/PREFIX)"
    if not text.startswith("s3://"):
        raise InputError(f"{flag}: {text!r} is not an object-store URL; {expected}")
    rest = text[len("s3://"):]
    embedded = re.match(r"^(https?://[^/]+)/?(.*)$", rest)
    if embedded:
        if endpoint_url and endpoint_url.rstrip("/") != embedded.group(1):
            raise InputError(f"--endpoint-url: {endpoint_url!r} disagrees with the endpoint in {flag} {text!r}; "
                             f"give it once")
        endpoint_url, rest = embedded.group(1), embedded.group(2)
    if endpoint_url is not None and not _ENDPOINT.match(endpoint_url):
        raise InputError(f"--endpoint-url: {endpoint_url!r} is not an endpoint; expected http://HOST:PORT or https://HOST")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise InputError(f"{flag}: bucket {bucket!r} in {text!r} is not a bucket name (3-63 lowercase letters, "
                         f"digits, '-' or '.'); {expected}")
    prefix = prefix.rstrip("/")
    if prefix.startswith("/") or "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
        raise InputError(f"{flag}: prefix {prefix!r} in {text!r} has an empty, '.' or '..' part; {expected}")
    return StoreLocation(bucket, prefix, endpoint_url.rstrip("/") if endpoint_url else None)


# --- talking to the store -----------------------------------------------------------------------
def store_client(location: StoreLocation):
    """A boto3 S3 client for ``location`` with the environment's (or profile's) credentials."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise StoreError(f"no credentials for {location.where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         f"(or AWS_PROFILE) in the environment")
    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    return session.client("s3", endpoint_url=location.endpoint_url, region_name=session.region_name or "us-east-1",
                          config=config)


@contextmanager
def store_errors(location: StoreLocation, doing: str) -> Iterator[None]:
    """Turn botocore's exceptions into one-line ``StoreError``s that say what to fix."""
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                     NoCredentialsError)

    try:
        yield
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in _CREDENTIAL_CODES:
            raise StoreError(f"{location.where} refused the credentials ({code}) while {doing}: check "
                             f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
        if code in _NO_BUCKET_CODES:
            raise StoreError(f"bucket {location.bucket!r} does not exist at {location.endpoint_url or 'AWS S3'}: "
                             f"create it or fix the URL") from None
        message = error.response.get("Error", {}).get("Message", "")
        raise StoreError(f"{location.where}: {code or 'error'} while {doing}: {message}".rstrip(": ")) from None
    except NoCredentialsError:
        raise StoreError(f"no credentials for {location.where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         f"(or AWS_PROFILE) in the environment") from None
    except BotoConnectionError as error:
        raise StoreError(f"the store {location.endpoint_url or 'AWS S3'} cannot be reached while {doing} "
                         f"({type(error).__name__}); check --endpoint-url and that the store is running") from None
    except BotoCoreError as error:
        raise StoreError(f"{location.where}: {type(error).__name__} while {doing}: {error}") from None


def check_bucket(s3, location: StoreLocation) -> None:
    with store_errors(location, "opening the bucket"):
        s3.head_bucket(Bucket=location.bucket)


def read_manifest(s3, location: StoreLocation) -> dict | None:
    """The store's posterrt-store.json, or None where nothing was pushed."""
    from botocore.exceptions import ClientError

    with store_errors(location, f"reading {STORE_MANIFEST}"):
        try:
            body = s3.get_object(Bucket=location.bucket, Key=location.key(STORE_MANIFEST))["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
    manifest = json.loads(body)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise StoreError(f"{location.url}/{STORE_MANIFEST} has format {manifest.get('format')!r}; this posterrt "
                         f"reads format {MANIFEST_FORMAT}")
    return manifest


def list_objects(s3, location: StoreLocation, under: str = "") -> dict[str, int]:
    """{key relative to the prefix: size} of every object under ``under``."""
    start = location.key(under) if under else (location.prefix + "/" if location.prefix else "")
    found = {}
    with store_errors(location, "listing the repository"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=start):
            for item in page.get("Contents", []):
                relative = item["Key"][len(location.prefix) + 1:] if location.prefix else item["Key"]
                found[relative] = item["Size"]
    return found


# --- the local repository -----------------------------------------------------------------------
@dataclass
class LocalModel:
    name: str
    config: Path
    files: dict[str, Path]  # path inside the version folder -> local file
    file_hashes: dict[str, str] = field(default_factory=dict)
    sha256: str = ""  # content hash of the config and every file

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files.values())


def _file_sha256(path: Path, progress) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(8 << 20), b""):
            digest.update(chunk)
            progress.update(len(chunk))
    return digest.hexdigest()


def _config_text(config: Path) -> str:
    """The config as pushed before its version is pinned: the part of the content hash it adds."""
    parsed = parse_pbtxt(config.read_text())
    parsed.ClearField("version_policy")
    return to_pbtxt(parsed)


def find_models(repo: str | Path) -> dict[str, LocalModel]:
    """Every model of a built repository (``<model>/config.pbtxt`` + one version folder), not hashed yet."""
    root = Path(repo)
    if not root.is_dir():
        raise InputError(f"--repo: {root} does not exist; build it with `posterrt repo build`")
    models = {}
    for config in sorted(root.glob(f"*/{CONFIG}")):
        folder = config.parent
        if folder.name.startswith("."):  # a build's staging folder
            continue
        versions = [v for v in folder.iterdir() if v.is_dir() and v.name.isdigit()]
        if len(versions) != 1:
            raise InputError(f"--repo: model {folder.name} has {len(versions)} version folders "
                             f"({sorted(v.name for v in versions)}), expected the one `posterrt repo build` writes")
        files = {p.relative_to(versions[0]).as_posix(): p for p in sorted(versions[0].rglob("*")) if p.is_file()}
        models[folder.name] = LocalModel(folder.name, config, files)
    if not models:
        raise InputError(f"--repo: {root} holds no model (no <model>/{CONFIG}); build it with `posterrt repo build`")
    return models


def hash_models(models: dict[str, LocalModel], progress: bool = True) -> dict[str, LocalModel]:
    """Fill each model's file hashes and content hash (its config without version_policy, and its files)."""
    from tqdm import tqdm

    total = sum(m.size for m in models.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing", disable=not progress, leave=False) as bar:
        for model in models.values():
            model.file_hashes = {name: _file_sha256(path, bar) for name, path in model.files.items()}
            lines = [f"{CONFIG}\t{hashlib.sha256(_config_text(model.config).encode()).hexdigest()}"]
            lines += [f"{name}\t{digest}" for name, digest in model.file_hashes.items()]
            model.sha256 = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return models


def pinned_config(config: Path, version: int) -> bytes:
    """The config with ``version_policy: specific [version]``: servers load that version only."""
    parsed = parse_pbtxt(config.read_text())
    parsed.version_policy.specific.versions[:] = [version]
    return to_pbtxt(parsed).encode()


# --- push ---------------------------------------------------------------------------------------
@dataclass
class PushReport:
    location: StoreLocation
    changed: dict[str, tuple[int | None, int]] = field(default_factory=dict)  # model -> (old, new) version
    unchanged: dict[str, int] = field(default_factory=dict)  # model -> live version
    uploaded_bytes: int = 0
    skipped_files: int = 0  # already in the store from an interrupted push
    pruned: list[str] = field(default_factory=list)  # version folders removed (older than the previous)


def _next_version(entry: dict | None) -> int:
    if entry is None:
        return 1
    return max(entry["version"], entry.get("previous") or 0) + 1


def _already_there(s3, location: StoreLocation, key: str, size: int, digest: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=location.bucket, Key=location.key(key))
    except ClientError:
        return False
    return head.get("ContentLength") == size and head.get("Metadata", {}).get("sha256") == digest


def push_repository(repo: str | Path, location: StoreLocation, *, progress: bool = True,
                    log: Callable[[str], None] = print) -> PushReport:
    """Upload the models of ``repo`` that changed since the last push as new versions (see the module doc)."""
    local = find_models(repo)
    s3 = store_client(location)
    check_bucket(s3, location)  # before hashing GBs: a wrong URL or key fails at once
    manifest = read_manifest(s3, location) or {"format": MANIFEST_FORMAT, "models": {}}
    hash_models(local, progress)
    report = PushReport(location)
    plan = {}
    for name, model in local.items():
        entry = manifest["models"].get(name)
        if entry is not None and entry["sha256"] == model.sha256:
            report.unchanged[name] = entry["version"]
        else:
            plan[name] = _next_version(entry)
            report.changed[name] = (entry["version"] if entry else None, plan[name])
    rerun = f"posterrt repo push --repo {repo} --to {location.url}" + (
        f" --endpoint-url {location.endpoint_url}" if location.endpoint_url else "")
    served = ", ".join(f"{n} v{e['version']}" for n, e in sorted(manifest["models"].items())) or "nothing"
    if not plan:
        return report
    stage = "uploading"
    try:
        _upload_versions(s3, location, local, plan, report, progress)
        stage = "switching configs"
        for name, version in plan.items():  # the switch: configs last, one small object each
            with store_errors(location, f"writing {name}/{CONFIG}"):
                s3.put_object(Bucket=location.bucket, Key=location.key(f"{name}/{CONFIG}"),
                              Body=pinned_config(local[name].config, version))
        for name, version in plan.items():
            old = manifest["models"].get(name)
            manifest["models"][name] = {"version": version, "previous": old["version"] if old else None,
                                        "sha256": local[name].sha256,
                                        "files": {f: {"size": local[name].files[f].stat().st_size, "sha256": h}
                                                  for f, h in local[name].file_hashes.items()}}
        with store_errors(location, f"writing {STORE_MANIFEST}"):
            s3.put_object(Bucket=location.bucket, Key=location.key(STORE_MANIFEST),
                          Body=json.dumps(manifest, indent=1, sort_keys=True).encode(), ContentType="application/json")
    except (StoreError, KeyboardInterrupt) as error:
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
        now = "the store still serves " + served if stage == "uploading" else \
            "some models may already be switched to their new version"
        raise StoreError(f"push to {location.url} stopped while {stage} ({reason}); {now}; rerun `{rerun}` to "
                         f"finish it (files already uploaded are skipped)") from None
    report.pruned = _prune(s3, location, manifest, plan)
    return report


def _upload_versions(s3, location: StoreLocation, local: dict[str, LocalModel], plan: dict[str, int],
                     report: PushReport, progress: bool) -> None:
    from boto3.s3.transfer import TransferConfig
    from tqdm import tqdm

    transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
    uploads = []
    for name, version in plan.items():
        model = local[name]
        existing = list_objects(s3, location, f"{name}/{version}/")
        for stale in sorted(set(existing) - {f"{name}/{version}/{f}" for f in model.files}):
            with store_errors(location, f"removing {stale} left by an earlier push"):
                s3.delete_object(Bucket=location.bucket, Key=location.key(stale))
        for relative, path in model.files.items():
            key, size = f"{name}/{version}/{relative}", path.stat().st_size
            if key in existing and existing[key] == size and \
                    _already_there(s3, location, key, size, model.file_hashes[relative]):
                report.skipped_files += 1
            else:
                uploads.append((key, path, size, model.file_hashes[relative]))
    total = sum(size for *_, size, _ in uploads)
    with tqdm(total=total, unit="B", unit_scale=True, desc="push", disable=not progress) as bar:
        for key, path, size, digest in uploads:
            with store_errors(location, f"uploading {key}"):
                s3.upload_file(str(path), location.bucket, location.key(key), Config=transfer,
                               ExtraArgs={"Metadata": {"sha256": digest}}, Callback=bar.update)
            report.uploaded_bytes += size


def _prune(s3, location: StoreLocation, manifest: dict, plan: dict[str, int]) -> list[str]:
    """Remove the version folders of the pushed models older than the previous version."""
    pruned = []
    for name in plan:
        entry = manifest["models"][name]
        keep = {str(entry["version"]), str(entry["previous"])}
        for key in list_objects(s3, location, f"{name}/"):
            version = key.split("/")[1]
            if version.isdigit() and version not in keep:
                with store_errors(location, f"removing the old version {name}/{version}"):
                    s3.delete_object(Bucket=location.bucket, Key=location.key(key))
                if f"{name}/{version}" not in pruned:
                    pruned.append(f"{name}/{version}")
    return pruned


# --- check before serving -----------------------------------------------------------------------
@dataclass
class StoreStatus:
    location: StoreLocation
    live: dict[str, int]  # model -> the version its config pins
    pending: dict[str, int] = field(default_factory=dict)  # model -> a newer version folder not switched to


def check_store(location: StoreLocation) -> StoreStatus:
    """The store holds a complete pushed repository: every model's live version has all its files.
    Half-uploaded newer versions (a push that stopped) are reported, not served."""
    s3 = store_client(location)
    check_bucket(s3, location)
    manifest = read_manifest(s3, location)
    if manifest is None:
        pushed = _repositories_beside(s3, location)
        hint = f"; repositories pushed under s3://{location.bucket}: {', '.join(pushed)}" if pushed else ""
        raise StoreError(f"{location.where} holds no posterrt repository (no {STORE_MANIFEST}): push one with "
                         f"`posterrt repo push`, or fix the URL{hint}")
    objects = list_objects(s3, location)
    status = StoreStatus(location, {})
    for name, entry in sorted(manifest["models"].items()):
        version = entry["version"]
        missing = [f for f, info in entry["files"].items() if objects.get(f"{name}/{version}/{f}") != info["size"]]
        if missing or f"{name}/{CONFIG}" not in objects:
            what = f"{name}/{version}/{missing[0]}" if missing else f"{name}/{CONFIG}"
            raise StoreError(f"{location.url}: model {name} version {version} is incomplete ({what} is missing "
                             f"or has another size); push the repository again with `posterrt repo push`")
        status.live[name] = version
        newer = {int(k.split("/")[1]) for k in objects if k.startswith(f"{name}/") and k.count("/") >= 2
                 and k.split("/")[1].isdigit() and int(k.split("/")[1]) > version}
        if newer:
            status.pending[name] = max(newer)
    return status


def _repositories_beside(s3, location: StoreLocation) -> list[str]:
    """Where in the bucket a posterrt repository was pushed (to name them when the URL has a typo)."""
    found = []
    with store_errors(location, "listing the bucket"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=location.bucket,
                                                                 PaginationConfig={"MaxItems": 10000}):
            found += [f"s3://{location.bucket}/{item['Key'][:-len(STORE_MANIFEST)].rstrip('/')}".rstrip("/")
                      for item in page.get("Contents", []) if item["Key"].endswith(STORE_MANIFEST)]
            if len(found) >= 5:
                break
    return found[:5]
