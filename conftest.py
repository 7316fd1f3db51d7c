"""The bench's fixtures and options come from the lorabench pytest plugin (lorabench/pytest_plugin/),
which pytest loads through its ``pytest11`` entry point once lorabench is installed. A checkout used
without installing it (on ``PYTHONPATH``) has no entry point: register the plugin here then, and only
then, since registering it twice is an error (and ``-p no:lorabench`` must still turn it off).
This repository's own fixture modules (fixtures/) would be appended to ``pytest_plugins``."""

from importlib.metadata import distributions

# every distribution, as pytest scans them: a stale lorabench.egg-info in the working directory
# would otherwise hide the installed metadata that holds the entry point
_INSTALLED = any(ep.group == "pytest11" and ep.name == "lorabench"
                 for dist in distributions() for ep in dist.entry_points)
pytest_plugins = [] if _INSTALLED else ["lorabench.pytest_plugin"]
