"""
TEMPORARY minimal package root on the `redis` branch: the lead is rebuilding
the client on branch `core`; only errors, requests, state and stores import
here. Do not edit; it is replaced when the branch is merged.
"""

from __future__ import annotations
