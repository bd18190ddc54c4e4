"""The read-only dashboard served by the collector at ``/ui`` (docs/dashboard.md).

* ``store.py``: the queries behind it, with the episode list cached per store listing.
* ``api.py``: the aiohttp routes (JSON API under ``/ui/api``, static files under ``/ui``).
* ``static/``: plain HTML, CSS and JavaScript; no build step, nothing from the internet.
"""
