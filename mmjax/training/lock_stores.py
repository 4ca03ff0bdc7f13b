"""Where a workdir's lock lives: `W/lock.json` as a local file, or as an object on a bucket.

Every change is conditional on the lock's generation (see mmjax/training/lock.py for the design), so of several
runs racing for one workdir exactly one wins. `LocalLockStore` (local and network disks): the generation is the
file's content, compared under a short `flock` on `W/lock.json.guard`. On object stores, the store's own
preconditions, no guard file:
- gs://  create: upload with `ifGenerationMatch=0` (412 if the object exists); replace and delete:
         `ifGenerationMatch=<the generation we hold>` (412: another run changed it). The generation is GCS's.
- s3://  create: PutObject with `If-None-Match: *`; replace: PutObject with `If-Match: <ETag we hold>`; delete:
         DeleteObject with `If-Match` (S3's conditional writes, 2024; moto and MinIO have them too).

A failure of the store other than a failed precondition (no such bucket, no credentials, network) is raised as
`StorageError` naming the lock's URL, which the lock reports as one line.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import os
import uuid
from collections.abc import Iterator

from mmjax import storage
from mmjax.errors import StorageError

LOCK_NAME = "lock.json"
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


class LockStore(abc.ABC):
    """Where a lock lives; every write is conditional on a generation (see the module's docstring)."""

    location: str

    @abc.abstractmethod
    def create(self, data: bytes) -> object | None: ...

    @abc.abstractmethod
    def read(self) -> tuple[bytes, object, float] | None:
        """(content, generation, last-modified time) of the lock, or None when there is none."""

    @abc.abstractmethod
    def replace(self, data: bytes, generation: object) -> object | None: ...

    @abc.abstractmethod
    def delete(self, generation: object) -> bool: ...


class LocalLockStore(LockStore):
    """A lock file on a local or network file system; the generation is the file's content."""

    def __init__(self, path: str):
        self.location = path
        self._guard = path + ".guard"

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        with open(self._guard, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _temporary(self, data: bytes) -> str:
        tmp = f"{self.location}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp

    def create(self, data: bytes) -> bytes | None:
        tmp = self._temporary(data)
        try:
            os.link(tmp, self.location)
            return data
        except FileExistsError:
            return None
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
        finally:
            os.unlink(tmp)
        return self._create_exclusive(data)

    def _create_exclusive(self, data: bytes) -> bytes | None:
        """`create` where hard links are not supported: O_CREAT|O_EXCL, written under the guard (a reader that
        looks in between sees an unreadable lock, which only ever refuses)."""
        with self._guarded():
            try:
                fd = os.open(self.location, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return data

    def read(self) -> tuple[bytes, bytes, float] | None:
        try:
            with open(self.location, "rb") as f:
                data = f.read()
                modified = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return data, data, modified

    def replace(self, data: bytes, generation: object) -> bytes | None:
        with self._guarded():
            current = self.read()
            if current is None or current[1] != generation:
                return None
            os.replace(self._temporary(data), self.location)
            return data

    def delete(self, generation: object) -> bool:
        with self._guarded():
            current = self.read()
            if current is None or current[1] != generation:
                return False
            os.unlink(self.location)
            return True


def _split(url: str) -> tuple[str, str]:
    """('bucket', 'key') of `gs://bucket/key` / `s3://bucket/key`."""
    bucket, _, key = url.split("://", 1)[1].partition("/")
    return bucket, key


@contextlib.contextmanager
def _as_storage_error(url: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - the clients raise many kinds: HTTP, credentials, connection
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StorageError(f"cannot read or write the workdir lock {url}: {reason}; check the bucket and your "
                           f"credentials") from error


class GcsLockStore(LockStore):
    """`lock.json` on GCS; the generation is the object's GCS generation (an int)."""

    def __init__(self, url: str):
        from google.cloud import storage as gcs  # lazy: only object-store workdirs need the client (~0.5 s)

        self.location = url
        bucket, self._key = _split(url)
        with _as_storage_error(url):
            self._bucket = gcs.Client().bucket(bucket)

    def _precondition_failed(self, error: Exception) -> bool:
        code = getattr(error, "code", None)
        return code in (404, 412)

    def create(self, data: bytes) -> int | None:
        return self.replace(data, 0)

    def read(self) -> tuple[bytes, int, float] | None:
        with _as_storage_error(self.location):
            for _ in range(5):  # the object may change between its metadata and its content: read both again
                blob = self._bucket.get_blob(self._key)
                if blob is None:
                    return None
                try:
                    data = blob.download_as_bytes(if_generation_match=blob.generation)
                except Exception as error:  # noqa: BLE001 - google.api_core's HTTP errors
                    if self._precondition_failed(error):
                        continue
                    raise
                return data, int(blob.generation), blob.updated.timestamp()
        raise StorageError(f"the workdir lock {self.location} keeps changing while it is read")

    def replace(self, data: bytes, generation: object) -> int | None:
        blob = self._bucket.blob(self._key)
        with _as_storage_error(self.location):
            try:
                blob.upload_from_string(data, content_type="application/json", if_generation_match=int(generation))
            except Exception as error:  # noqa: BLE001 - google.api_core's HTTP errors
                if self._precondition_failed(error):
                    return None
                raise
        return int(blob.generation)

    def delete(self, generation: object) -> bool:
        with _as_storage_error(self.location):
            try:
                self._bucket.blob(self._key).delete(if_generation_match=int(generation))
            except Exception as error:  # noqa: BLE001 - google.api_core's HTTP errors
                if self._precondition_failed(error):
                    return False
                raise
        return True


class S3LockStore(LockStore):
    """`lock.json` on S3; the generation is the object's ETag."""

    def __init__(self, url: str):
        import boto3  # lazy: only object-store workdirs need the client (~0.3 s)

        self.location = url
        self._bucket, self._key = _split(url)
        with _as_storage_error(url):
            self._s3 = boto3.client("s3")

    @staticmethod
    def _condition_failed(error: Exception) -> bool:
        response = getattr(error, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in (404, 409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict",
                                                     "NoSuchKey", "404")

    def _put(self, data: bytes, **condition) -> str | None:
        with _as_storage_error(self.location):
            try:
                answer = self._s3.put_object(Bucket=self._bucket, Key=self._key, Body=data,
                                             ContentType="application/json", **condition)
            except Exception as error:  # noqa: BLE001 - botocore's ClientError
                if self._condition_failed(error):
                    return None
                raise
        return answer["ETag"]

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[bytes, str, float] | None:
        with _as_storage_error(self.location):
            try:
                answer = self._s3.get_object(Bucket=self._bucket, Key=self._key)
            except Exception as error:  # noqa: BLE001 - botocore's ClientError
                if self._condition_failed(error):
                    return None
                raise
            return answer["Body"].read(), answer["ETag"], answer["LastModified"].timestamp()

    def replace(self, data: bytes, generation: object) -> str | None:
        return self._put(data, IfMatch=str(generation))

    def delete(self, generation: object) -> bool:
        with _as_storage_error(self.location):
            try:
                self._s3.delete_object(Bucket=self._bucket, Key=self._key, IfMatch=str(generation))
            except Exception as error:  # noqa: BLE001 - botocore's ClientError
                if self._condition_failed(error):
                    return False
                raise
        return True


def object_store(workdir: str) -> LockStore:
    """The lock store of an object-store workdir (`gs://...` or `s3://...`)."""
    url = storage.join(workdir, LOCK_NAME)
    return GcsLockStore(url) if storage.scheme(url) == "gs" else S3LockStore(url)
