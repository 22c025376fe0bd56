"""The one exception the data path raises for a sample that cannot be used.

`BadSample` marks a problem with one record (malformed conversation, missing or unreadable image,
sample that does not fit), as opposed to a configuration error. A pipeline may catch it and skip the
record under an explicit ``on_bad_sample`` policy; everything else propagates.
"""

from __future__ import annotations

from typing import Any


class BadSample(ValueError):
    """A record that cannot be turned into a training or inference sample.

    Attributes:
      record_id: the record's ``id`` (or its index when it has none); None when unknown.
      reason: what is wrong, in words, with the fix where there is one.
      path: the file involved (an image, a JSON file), when there is one.
    """

    def __init__(self, record_id: Any, reason: str, path: str | None = None):
        self.record_id = record_id
        self.reason = reason
        self.path = path
        where = f" [{path}]" if path else ""
        super().__init__(f"bad sample {record_id!r}{where}: {reason}")

    def __reduce__(self):
        # Keeps the exception picklable across worker processes despite the custom signature.
        return (type(self), (self.record_id, self.reason, self.path))
