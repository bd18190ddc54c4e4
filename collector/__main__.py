"""``python -m tracetrain.collector ...`` is the ``tracetrain`` command."""

from tracetrain.collector.cli import main

main()
