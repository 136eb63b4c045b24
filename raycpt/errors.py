"""The root of raycpt's own errors.

Every error raycpt raises on purpose (bad config, bad data, an unusable checkpoint, unreachable
storage ...) derives from `RaycptError`: the CLI renders it as one paragraph and exits 2, and a
worker that raises one fails the run at once instead of being retried (it would fail the same way
again). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RaycptError(Exception):
    """An error whose message tells the user what is wrong, which key or file, and the fix."""
