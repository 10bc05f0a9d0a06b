"""The syntax of fence devices in a ClusterNode: names, reserved parameters and safe values.

Pure rules shared by validation (crds/clusternode.py) and the fence runner's policy
(reconcilers/drivers/fence_policy.py), which adds the checks that need the agent's metadata.
"""

from __future__ import annotations

import re
import unicodedata

RESERVED_PARAMETERS: frozenset[str] = frozenset(
    {"action", "plug_action", "help", "usage", "version"}
)

AGENT_NAME = re.compile(r"fence_[a-z0-9_]{1,60}")
PARAMETER_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
PLAIN_VALUE = re.compile(r"(?!-)[A-Za-z0-9._:@/%+,=\[\]-]{0,1024}")
"""A plain (non-secret) parameter value, for `fullmatch`."""
UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def value_problem(value: str) -> str | None:
    """Why `value` cannot be one `key=value` line of an agent's input, or None."""
    if any(unicodedata.category(character) in UNSAFE_CATEGORIES for character in value):
        return (
            "contains a control character, line break or lone surrogate, which could inject "
            "extra lines into the agent's input"
        )
    if value != value.strip():
        return "has leading or trailing whitespace, which the agent would strip"
    return None


def plain_value_problem(value: str) -> str | None:
    """Why `value` may not be a plain parameter value, or None."""
    if PLAIN_VALUE.fullmatch(value):
        return None
    return (
        "may use only letters, digits and . _ : @ / % + , = [ ] - and may not start with '-' "
        "(agents paste values into command lines); a credential belongs in secretParameters"
    )
