"""Config files as YAML with line numbers: every problem as ``FILE:LINE: field.path: why``.

Generic: nothing here knows about relayd. ``walker`` composes and walks nodes (interpolation,
secret hiding, mappings with unknown-key suggestions, schema dataclasses); ``readers`` turns
scalars into typed values (string, bool, int, duration, size, listen, url, CIDR, secrets).
"""

from .readers import *  # noqa: F401,F403
from .readers import __all__ as _readers_all
from .walker import (REQUIRED, ConfigError, Finish, Items, Problem, Reader, Walker, controls, is_null,
                     join, key, keys_of, kind, redact_url, show, suggest)

__all__ = ["REQUIRED", "ConfigError", "Finish", "Items", "Problem", "Reader", "Walker", "controls",
           "is_null", "join", "key", "keys_of", "kind", "redact_url", "show", "suggest", *_readers_all]
