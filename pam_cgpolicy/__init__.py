"""cgpolicy: login-node resource policy on systemd user slices."""

__version__ = "0.1.0"
