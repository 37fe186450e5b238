"""Lists the audit log events and a site's round statuses from the enums that write them (common/wire/protocol.py).

A hand-written file-format page names a placeholder (`<!-- generated: audit-events -->`); the
build fills it, so a new event is documented as soon as the code can write it.
"""

from __future__ import annotations

from enum import StrEnum

from refgen.benchmarks import results_table
from refgen.config_keys import field_comments


def enum_table(cls: type[StrEnum], heading: str) -> str:
    """A Markdown table of the enum's values and the comment the source gives each."""
    comments = field_comments(cls)
    rows = [f"| {heading} | meaning |", "| --- | --- |"]
    rows += [f"| `{member.value}` | {comments.get(member.name, '')} |" for member in cls]
    return "\n".join(rows)


def placeholders() -> dict[str, str]:
    """Placeholder name -> its generated Markdown (the benchmarks' result files too)."""
    from fedtransfer.common.wire.protocol import Event, SiteStatus

    return {
        "benchmark-results": results_table(),
        "audit-events": enum_table(Event, "event"),
        "site-statuses": enum_table(SiteStatus, "status"),
    }
