"""Kernel plumbing for the sandbox engine: namespaces and cgroups (Linux only)."""
