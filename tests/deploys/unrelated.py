"""A module that defines none of the workflows the tests leave running."""

from __future__ import annotations

from stepline.worker import Context, workflow


@workflow("unrelated")
async def unrelated(ctx: Context, params: None) -> None:
    return None
