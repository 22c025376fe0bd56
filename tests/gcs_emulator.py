"""A Google Cloud Storage emulator on 127.0.0.1 for tests of gs:// paths, offline.

`gcp-storage-emulator` (pure Python, in-memory) speaks the GCS JSON API. Both clients the project
uses are pointed at it through their documented endpoint settings: `STORAGE_EMULATOR_HOST` for gcsfs
(what etils epath uses for gs:// files), `TENSORSTORE_GCS_HTTP_URL` for tensorstore (what orbax
writes the arrays with) and `CLOUD_STORAGE_EMULATOR_ENDPOINT` for the google-cloud-cpp client inside
ArrayRecord. `GOOGLE_AUTH_TOKEN_FOR_TESTING` keeps tensorstore from looking for cloud credentials.
The objects are read back here with plain HTTP, independent of the clients.

The emulator's object download leaves out two things of the GCS API that tensorstore relies on (the
`x-goog-generation` header, and the `ifGenerationMatch` / `ifGenerationNotMatch` preconditions it
revalidates its cache with); `_serve` adds them, running as its own process:
`python tests/gcs_emulator.py PORT BUCKET`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    def __init__(self, bucket: str = "bucket"):
        self.bucket = bucket
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.port), bucket], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120  # generous: only bounds a broken start-up
        while True:
            try:
                self.names("")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.2)

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GOOGLE_CLOUD_PROJECT": "test",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,  # google-cloud-cpp, inside ArrayRecord
        }

    def names(self, prefix: str) -> list[str]:
        """Object names under `prefix` in the bucket (the emulator's JSON API, paged)."""
        names, token = [], None
        while True:
            q = {"prefix": prefix, **({"pageToken": token} if token else {})}
            with urllib.request.urlopen(
                f"{self.url}/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(q)}", timeout=30
            ) as r:
                page = json.loads(r.read())
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def read(self, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o/{quoted}?alt=media", timeout=30) as r:
            return r.read()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def emulator_env(emulator: GcsEmulator):
    """Point this process's gcsfs and tensorstore at the emulator (and back afterwards)."""
    import gcsfs

    old = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gcsfs.GCSFileSystem.clear_instance_cache()


def _serve(port: int, bucket: str) -> None:
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return plain(request, response, storage, *args, **kwargs)
        generation, q = str(obj["generation"]), request.query
        if "ifGenerationMatch" in q and q["ifGenerationMatch"][0] != generation:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        if "ifGenerationNotMatch" in q and q["ifGenerationNotMatch"][0] == generation:
            response.status = HTTPStatus.NOT_MODIFIED
            return None
        response["x-goog-generation"] = generation
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return plain(request, response, storage, *args, **kwargs)

    objects.download = download  # before the server module builds its routing table
    from gcp_storage_emulator.server import create_server

    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    import logging

    logging.disable(logging.CRITICAL)
    _serve(int(sys.argv[1]), sys.argv[2])
