"""A Google Cloud Storage emulator on 127.0.0.1 for the object-store tests.

``python tests/gcs_emulator.py PORT`` serves gcp-storage-emulator's JSON API,
in memory, on ``127.0.0.1:PORT`` only. One thing is added that real GCS has
and the emulator lacks: the precondition ``ifGenerationMatch=0`` ("create
only if absent"), answered 412 when the object exists. The workdir lock relies
on it, so the tests would otherwise prove nothing about the lock. The server
handles one request at a time, so the check and the write cannot interleave.
Second, an object's download carries its generation in ``x-goog-generation``,
as real GCS sends it: tensorstore (orbax's array reader) reads it from there.
"""

import json
import re
import sys
import time
from urllib.parse import parse_qs, unquote, urlparse

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.storage import Storage


class _ObjectExists(Exception):
    pass


_create_only = False  # the request being handled asked ifGenerationMatch=0
_create_file = Storage.create_file


def _create_file_if_allowed(self, bucket_name, file_name, *args, **kwargs):
    if _create_only:
        try:
            self.get_file_obj(bucket_name, file_name)
        except NotFound:
            pass
        else:
            raise _ObjectExists(file_name)
    return _create_file(self, bucket_name, file_name, *args, **kwargs)


_handle = server.Router.handle


def _handle_with_preconditions(self, method):
    global _create_only
    query = parse_qs(urlparse(self._request_handler.path).query)
    _create_only = query.get("ifGenerationMatch") == ["0"]
    try:
        _handle(self, method)
    except _ObjectExists:
        body = json.dumps({"error": {"code": 412, "message": "conditionNotMet"}}).encode()
        self._request_handler.send_response(412)
        self._request_handler.send_header("Content-Type", "application/json")
        self._request_handler.send_header("Content-Length", str(len(body)))
        self._request_handler.end_headers()
        self._request_handler.wfile.write(body)
    finally:
        _create_only = False


_OBJECT_PATH = re.compile(r"^(?:/download)?/storage/v1/b/([^/]+)/o/([^?]+)")
_end_headers = server.RequestHandler.end_headers


def _end_headers_with_generation(self):
    url = urlparse(self.path)
    match = _OBJECT_PATH.match(url.path)
    if self.command == "GET" and match and parse_qs(url.query).get("alt") == ["media"]:
        try:
            obj = self.storage.get_file_obj(match.group(1), unquote(match.group(2)))
            self.send_header("x-goog-generation", str(obj["generation"]))
            self.send_header("x-goog-metageneration", str(obj.get("metageneration", "1")))
        except NotFound:
            pass
    _end_headers(self)


server.RequestHandler.end_headers = _end_headers_with_generation
Storage.create_file = _create_file_if_allowed
server.Router.handle = _handle_with_preconditions

if __name__ == "__main__":
    emulator = server.Server("127.0.0.1", int(sys.argv[1]), in_memory=True)
    emulator.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)
