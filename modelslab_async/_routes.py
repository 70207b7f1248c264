"""
Where each job endpoint lives: one row per request class.

A request class carries its :class:`Route` as ``route``; the client sends it
to ``route.submit``, fetches its job at ``route.fetch + job_id``, and the
converter spells its booleans as ``route.booleans`` says. So a new endpoint
is a new request class with its row, and no other module changes.
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

import attrs


__all__ = [
    "FLUX_KLEIN_MANAGEMENT",
    "UPDATE_S3",
    "Booleans",
    "Endpoint",
    "Route",
]

#: The endpoint families: community/v6 ``images`` and the Enterprise Flux
#: Klein server. A family shares one fetch route and one wire spelling.
Endpoint: TypeAlias = Literal["v6", "flux-klein"]

#: How an endpoint spells booleans: JSON ``true``/``false`` or the strings
#: ``"yes"``/``"no"``.
Booleans: TypeAlias = Literal["json", "yes-no"]


@attrs.frozen
class Route:
    """
    Strictly private: where one kind of job is sent and fetched.

    Attributes:
        family: The endpoint family, as :attr:`JobHandle.endpoint
            <modelslab_async.JobHandle.endpoint>` reports it.
        submit: The submit path, below the client's ``base_url``.
        fetch: The fetch path prefix, below ``base_url``; the job id is
            appended.
        booleans: How the endpoint spells booleans on the wire.
    """

    family: Endpoint
    submit: str
    fetch: str
    booleans: Booleans


#: The Flux Klein server's management calls, below ``base_url``.
FLUX_KLEIN_MANAGEMENT: Final = "v1/enterprise/flux_klein/"
#: Where an Enterprise server's S3 settings go.
UPDATE_S3: Final = "v1/enterprise/update_s3"
