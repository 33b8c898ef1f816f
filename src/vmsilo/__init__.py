"""vmsilo: run programs in isolated VMs (crosvm or QEMU) on a Linux desktop.

This package is also copied into guest images (``vmsilo.channel`` and ``vmsilo.guest``), so this
module and those two subpackages import only the standard library.
"""

__version__ = "0.1.0"
