"""The client side of running VMs (qubesadmin's ``app``): start, stop, status, the plan a
running VM was started with, and which images running VMs use.

Commands (:mod:`vmsilo.cli`) talk to an :class:`~vmsilo.lifecycle.base.App`; which one — the
embedded supervisor or systemd — is decided in one place, :func:`vmsilo.lifecycle.app.open_app`,
and every command's ``main(argv=None, app=None)`` takes a fake instead in tests. What runs
inside the per-VM supervisor process stays in :mod:`vmsilo.supervisor`.
"""
