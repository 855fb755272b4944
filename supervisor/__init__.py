"""seccomp-supervisor: answer seccomp user notifications with Python policies.

Policy authors import from :mod:`supervisor.policy`; everything else is internal.
"""

__version__ = "0.1.0"
